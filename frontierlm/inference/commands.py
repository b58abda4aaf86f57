"""`frontierlm generate`, `frontierlm chat` and `frontierlm serve`: sampling from a model.

MODEL is a model directory, a run's stage directory (runs/quickstart/sft) or an exported
Hugging Face directory; the tokenizer is found beside it (or given with --tokenizer).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, TextIO

import torch

from frontierlm.atomic import write_text
from frontierlm.inference.engine import generate
from frontierlm.inference.loader import ROLES, InferenceModel, load_inference_model
from frontierlm.inference.stream import TextStream


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model dir, stage dir (runs/quickstart/sft) or HF export dir")
    p.add_argument("--tokenizer", help="tokenizer dir (default: beside the model or the run's)")
    p.add_argument("--device", default="auto", help="auto (CUDA when visible), cpu, cuda:0, ...")


def _sampling_args(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    p.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0: off")
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None)


def add_parsers(sub: Any) -> None:
    gen = sub.add_parser(
        "generate",
        help="sample completions from a model (raw text or --chat)",
        description="frontierlm generate runs/quickstart/sft --chat --prompt 'What is 2+3?' "
        "--temperature 0; or --file prompts.jsonl --out out.jsonl (lines with 'prompt' "
        "or 'messages')",
    )
    _model_args(gen)
    gen.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable)")
    gen.add_argument("--file", help="JSONL of {'prompt': text} or {'messages': [...]} records")
    gen.add_argument("--out", help="JSONL to write: each record plus its completion")
    gen.add_argument("--chat", action="store_true", help="render prompts with the chat template")
    gen.add_argument("--system", help="system message for --chat prompts")
    gen.add_argument(
        "--workers", type=int, default=1, help=">1: an engine pool (one process per GPU/CPU)"
    )
    _sampling_args(gen, 256)

    chat = sub.add_parser(
        "chat",
        help="talk to a model interactively (streaming, history; /reset, /exit)",
        description="frontierlm chat runs/quickstart/sft: type a message, the reply streams; "
        "/reset forgets the conversation, /exit (or end of input) quits",
    )
    _model_args(chat)
    chat.add_argument("--system", help="system message at the start of every conversation")
    _sampling_args(chat, 512)

    serve = sub.add_parser(
        "serve",
        help="OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions)",
        description="frontierlm serve runs/quickstart/sft --port 8000 (pip install "
        "'frontierlm[serve]')",
    )
    _model_args(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--name", help="model id clients send (default: run/stage or dir name)")
    serve.add_argument(
        "--batch-window-ms",
        type=float,
        default=10.0,
        help="how long a request waits for others to share its batch",
    )
    serve.add_argument("--max-batch", type=int, default=32, help="prompts per engine batch")


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _load(args: argparse.Namespace, name: str | None = None) -> InferenceModel:
    return load_inference_model(args.model, args.tokenizer, _device(args.device), name=name)


def _params(served: InferenceModel, args: argparse.Namespace, chat: bool, max_new_tokens: int):
    return served.params(
        chat,
        max_new_tokens=max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        stop_strings=tuple(args.stop),
        seed=args.seed,
    )


def _read_prompts(path: Path, chat: bool) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    records = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{line_no}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: not JSON ({err.msg})") from err
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected an object with 'prompt' or 'messages'")
        if "messages" in record:
            messages = record["messages"]
            ok = isinstance(messages, list) and all(
                isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)
                for m in messages
            )
            if not ok or not messages:
                raise ValueError(
                    f"{where}: 'messages' must be a non-empty list of "
                    f"{{'role': one of {list(ROLES)}, 'content': text}}"
                )
        elif isinstance(record.get("prompt"), str):
            if chat:  # --chat turns a plain prompt into one user message
                record = {**record, "messages": [{"role": "user", "content": record["prompt"]}]}
        else:
            raise ValueError(f"{where}: needs 'prompt' (text) or 'messages' (a chat)")
        records.append(record)
    if not records:
        raise ValueError(f"{path} holds no prompts")
    return records


def generate_command(args: argparse.Namespace) -> int:
    if not args.prompt and not args.file:
        raise ValueError("generate: give --prompt TEXT (repeatable) or --file prompts.jsonl")
    if args.out and not args.file:
        raise ValueError("generate: --out goes with --file (a --prompt prints its completion)")
    served = _load(args)
    records = [{"prompt": p} for p in args.prompt]
    if args.file:
        records += _read_prompts(Path(args.file), args.chat)
    system = [{"role": "system", "content": args.system}] if args.system else []
    prompts = []
    for record in records:
        if "messages" in record:
            prompts.append(served.chat_ids(system + record["messages"]))
        elif args.chat:
            prompts.append(
                served.chat_ids([*system, {"role": "user", "content": record["prompt"]}])
            )
        else:
            prompts.append(served.text_ids(record["prompt"]))
    chat = args.chat or any("messages" in r for r in records)
    longest = max(len(p) for p in prompts)
    if longest >= served.max_seq_len:
        raise ValueError(
            f"generate: a prompt is {longest} tokens, the model's context is "
            f"{served.max_seq_len}: shorten it"
        )
    params = _params(served, args, chat, served.room(longest, args.max_new_tokens))
    if args.workers > 1:
        from frontierlm.inference.pool import EnginePool, default_devices

        devices = default_devices(args.workers)
        with EnginePool(Path(args.model), served.tokenizer, devices=devices) as pool:
            out = pool.generate(prompts, params)
    else:
        out = generate(served.model, prompts, params, tokenizer=served.tokenizer)
    results = []
    for record, prompt, completion in zip(records, prompts, out, strict=True):
        results.append(
            {
                **record,
                "completion": served.decode(completion.ids),
                "finish_reason": completion.finish_reason,
                "prompt_tokens": len(prompt),
                "completion_tokens": len(completion.ids),
            }
        )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results)
        write_text(Path(args.out), lines)
        print(f"wrote {len(results)} completions to {args.out}", file=sys.stderr)
    else:
        for i, r in enumerate(results):
            if len(results) > 1:
                print(f"--- {i} ({r['finish_reason']}, {r['completion_tokens']} tokens)")
            print(r["completion"])
    return 0


def chat_loop(
    served: InferenceModel,
    args: argparse.Namespace,
    stdin: TextIO,
    stdout: TextIO,
) -> None:
    """Read a line, stream the reply, keep the history; /reset and /exit."""
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = []
    interactive = stdin.isatty()
    stdout.write(f"chatting with {served.name} (/reset to forget, /exit to quit)\n")
    while True:
        if interactive:
            stdout.write("> ")
            stdout.flush()
        line = stdin.readline()
        if not line:  # end of input
            break
        text = line.rstrip("\n")
        if not interactive:  # scripted input: echo it so the transcript reads as a dialogue
            stdout.write(f"> {text}\n")
        if text.strip() == "/exit":
            break
        if text.strip() == "/reset":
            history = []
            stdout.write("(conversation reset)\n")
            continue
        if not text.strip():
            continue
        history.append({"role": "user", "content": text})
        prompt = served.chat_ids(system + history)
        # Forget the oldest turns when the conversation outgrows the context window.
        while len(prompt) >= served.max_seq_len - 1 and len(history) > 1:
            history = history[2:] if len(history) > 2 else history[-1:]
            stdout.write("(oldest turn forgotten: the context window is full)\n")
            prompt = served.chat_ids(system + history)
        if len(prompt) >= served.max_seq_len - 1:
            history.pop()
            stdout.write(
                f"(message too long: {len(prompt)} tokens, context {served.max_seq_len})\n"
            )
            continue
        params = _params(served, args, True, served.room(len(prompt), args.max_new_tokens))
        stream = TextStream(served.tokenizer, params.stop_strings)

        def show(_: int, token: int, stream: TextStream = stream) -> None:
            delta = stream.feed(token)
            if delta:
                stdout.write(delta)
                stdout.flush()

        out = generate(served.model, [prompt], params, tokenizer=served.tokenizer, on_token=show)
        stdout.write(stream.finish(out[0].ids) + "\n")
        stdout.flush()
        history.append({"role": "assistant", "content": served.decode(out[0].ids)})


def chat_command(args: argparse.Namespace) -> int:
    served = _load(args)
    try:
        chat_loop(served, args, sys.stdin, sys.stdout)
    except KeyboardInterrupt:
        print()
    return 0


def serve_command(args: argparse.Namespace) -> int:
    try:
        from frontierlm.inference.server import serve
    except ImportError as err:
        print(f"serve needs FastAPI and uvicorn ({err}): pip install 'frontierlm[serve]'")
        return 1
    served = _load(args, name=args.name)
    print(f"serving {served.name} at http://{args.host}:{args.port}/v1", file=sys.stderr)
    serve(served, args.host, args.port, args.batch_window_ms / 1000, args.max_batch)
    return 0


COMMANDS = {"generate": generate_command, "chat": chat_command, "serve": serve_command}
