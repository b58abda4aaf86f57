"""`frontierlm generate` (prompts, --file/--out, --chat) and `frontierlm chat` driven by scripted
stdin, checked against direct `generate` calls; the text stream never shows text the final
completion drops."""

from __future__ import annotations

import io
import json
import random

import pytest

from frontierlm.cli import main
from frontierlm.inference.engine import _trim_to_stop_string, generate
from frontierlm.inference.stream import TextStream


def greedy_text(served, prompt, chat, n):
    params = served.params(chat, max_new_tokens=n, temperature=0)
    out = generate(served.model, [prompt], params, tokenizer=served.tokenizer)[0]
    return served.decode(out.ids), out


def test_generate_file_writes_completions_in_order(served, tiny_run, tmp_path, capsys):
    records = [
        {"prompt": "To be, or not to be", "id": "a"},
        {"messages": [{"role": "user", "content": "Who is Coriolanus?"}], "id": "b"},
        {"prompt": "First Citizen:", "id": "c"},
    ]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "out" / "completions.jsonl"
    args = ["generate", str(tiny_run), "--file", str(prompts), "--out", str(out)]
    assert main([*args, "--temperature", "0", "--max-new-tokens", "9"]) == 0
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in written] == ["a", "b", "c"]
    expected = [
        greedy_text(served, served.text_ids(records[0]["prompt"]), False, 9),
        greedy_text(served, served.chat_ids(records[1]["messages"]), True, 9),
        greedy_text(served, served.text_ids(records[2]["prompt"]), False, 9),
    ]
    for record, (text, completion) in zip(written, expected, strict=True):
        assert record["completion"] == text
        assert record["finish_reason"] == completion.finish_reason
        assert record["completion_tokens"] == len(completion.ids)
    assert written[1]["messages"] == records[1]["messages"]  # the input record is kept


def test_generate_prompt_prints_and_bad_files_name_the_line(served, tiny_run, tmp_path, capsys):
    args = ["generate", str(tiny_run), "--prompt", "ROMEO:", "--chat", "--temperature", "0"]
    assert main([*args, "--max-new-tokens", "7"]) == 0
    text, _ = greedy_text(served, served.chat_ids([{"role": "user", "content": "ROMEO:"}]), True, 7)
    assert capsys.readouterr().out == text + "\n"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"messages": [{"role": "user"}]}\n')
    assert main(["generate", str(tiny_run), "--file", str(bad), "--out", str(tmp_path / "o")]) == 1
    squeezed = lambda: "".join(capsys.readouterr().err.split())  # noqa: E731 (rich wraps lines)
    assert f"{bad}:2:'messages'mustbe" in squeezed()
    assert main(["generate", str(tmp_path), "--prompt", "x"]) == 1
    assert "holdsnomodel" in squeezed()


def test_chat_streams_keeps_history_resets_and_exits(served, tiny_run, monkeypatch, capsys):
    script = "Hello there\nWhat did you say?\n/reset\nHello there\n/exit\nnever read\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(script))
    assert main(["chat", str(tiny_run), "--temperature", "0", "--max-new-tokens", "12"]) == 0
    first, _ = greedy_text(
        served, served.chat_ids([{"role": "user", "content": "Hello there"}]), True, 12
    )
    history = [
        {"role": "user", "content": "Hello there"},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "What did you say?"},
    ]
    second, _ = greedy_text(served, served.chat_ids(history), True, 12)
    assert first and second and first != second
    assert capsys.readouterr().out == (
        f"chatting with {served.name} (/reset to forget, /exit to quit)\n"
        f"> Hello there\n{first}\n"
        f"> What did you say?\n{second}\n"
        "> /reset\n(conversation reset)\n"
        f"> Hello there\n{first}\n"  # after /reset the history is gone: the first reply again
        "> /exit\n"
    )


@pytest.mark.parametrize("seed", range(5))
def test_text_stream_emits_only_final_text(served, seed):
    """Random token runs, stop strings taken from their text: what streams out is always a
    prefix of the final (engine-trimmed) text, and the pieces add up to it."""
    rng = random.Random(seed)
    tok = served.tokenizer
    for _ in range(20):
        ids = [rng.randrange(7, 1024) for _ in range(rng.randrange(1, 30))]
        text = tok.decode(ids)
        start = rng.randrange(len(text)) if text else 0
        stops = (text[start : start + rng.randrange(1, 4)] or "zz", "\n\n")
        # What generate would return: tokens up to the one completing a stop string, trimmed.
        taken = []
        for t in ids:
            taken.append(t)
            if any(s in tok.decode(taken) for s in stops):
                break
        final = _trim_to_stop_string(taken, [0.0] * len(taken), stops, tok)[0]
        stream = TextStream(tok, stops)
        pieces = []
        for t in taken:
            pieces.append(stream.feed(t))
            assert tok.decode(final).startswith("".join(pieces))
        pieces.append(stream.finish(final))
        assert "".join(pieces) == tok.decode(final)


def test_loading_from_a_model_dir_or_a_stage_dir_finds_the_runs_tokenizer(
    served, tiny_run, tmp_path, make_random_model
):
    from frontierlm.inference.loader import load_inference_model
    from frontierlm.tokenizer.train import END

    direct = load_inference_model(tiny_run / "model")
    assert direct.name == served.name == "run0/sft"
    assert direct.tokenizer.to_str() == served.tokenizer.to_str()
    assert direct.chat_stop_ids[0] == served.tokenizer.token_to_id(END)
    ids = served.chat_ids([{"role": "user", "content": "hi"}])
    assert ids[0] == served.bos and ids[-1] == served.tokenizer.token_to_id("<|assistant|>")
    # A model whose vocabulary is smaller than the tokenizer's is refused, naming both.
    from frontierlm.train.checkpoint import save_model_dir

    save_model_dir(tmp_path / "small", make_random_model(vocab_size=300, d_model=32, n_layers=1))
    with pytest.raises(
        ValueError, match=r"\(1026 tokens\) does not fit the model .* \(vocab 300\)"
    ):
        load_inference_model(tmp_path / "small", tokenizer=tiny_run.parent / "tokenizer")
    with pytest.raises(FileNotFoundError, match=r"no tokenizer\.json"):
        load_inference_model(tmp_path / "small")


def test_chat_forgets_the_oldest_turns_when_the_context_fills(
    served, tiny_run, monkeypatch, capsys
):
    long_message = "the king " * 25
    first_prompt = served.chat_ids([{"role": "user", "content": long_message}])
    assert 60 < len(first_prompt) < 100  # two such turns overflow the 128-token context
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{long_message}\n{long_message}\n"))
    assert main(["chat", str(tiny_run), "--temperature", "0", "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    notice = "(oldest turn forgotten: the context window is full)"
    assert out.count(notice) == 1
    alone, _ = greedy_text(served, first_prompt, True, 6)
    # The second reply saw only the second message: the same text as the first reply.
    assert out.endswith(f"> {long_message}\n{alone}\n> {long_message}\n{notice}\n{alone}\n")
