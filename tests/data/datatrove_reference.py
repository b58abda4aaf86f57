"""datatrove's filters set up as FrontierLM's equivalents, for the agreement test and the
data_pipeline benchmark (datatrove is a test/benchmark dependency, never imported at run time)."""

from __future__ import annotations

from typing import Any

from frontierlm.data.web_filters import shipped_list


def datatrove_url_filter() -> Any:
    """datatrove's URLFilter on our block lists (its own bundled lists off), with the
    public-suffix snapshot inside tldextract, so nothing is downloaded."""
    from datatrove.pipeline.filters import URLFilter
    from tldextract import TLDExtract

    url = URLFilter(
        use_integrated_lists=False,
        extra_domains=shipped_list("url_domains.txt"),
        banned_words=shipped_list("url_banned_words.txt"),
        banned_subwords=shipped_list("url_banned_subwords.txt"),
        soft_banned_words=shipped_list("url_soft_banned_words.txt"),
    )
    url.tldextractor = TLDExtract(suffix_list_urls=())
    return url
