"""Generate text from a DeepSeek-V2 checkpoint: ``python -m infer.generate``.

    python -m infer.generate                                  # the bundled demo model
    python -m infer.generate --model deepseek-ai/DeepSeek-V2-Lite-Chat --chat
    python -m infer.generate --model ./my-model --prompt "ROMEO:" --temperature 0.8 --json

Text streams to stdout as it is generated; prefill and decode tokens/s go to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m infer.generate", description=__doc__.split("\n")[0])
    p.add_argument("--model", help="model folder or hub repo id (default: the bundled demo model)")
    p.add_argument("--prompt", help="prompt text (default: a short sample prompt)")
    p.add_argument("--chat", action="store_true", help="interactive multi-turn chat with the chat template")
    p.add_argument("--system", help="system message for --chat / chat-formatted prompts")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--json", action="store_true",
                   help="print prompt ids, output ids, text and timings as one JSON object")
    p.add_argument("--coordinator", help="jax.distributed coordinator host:port (multi-process runs)")
    p.add_argument("--num-processes", type=int)
    p.add_argument("--process-id", type=int)
    return p.parse_args(argv)


def _sampling(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                seed=args.seed, stop=args.stop, ignore_eos=args.ignore_eos)


def _report(stats: dict) -> None:
    print(f"\n[prefill {stats['prefill_tokens_per_s']:.1f} tok/s, "
          f"decode {stats['decode_tokens_per_s']:.1f} tok/s]", file=sys.stderr)


def run(args) -> int:
    import dsv2_jax
    from dsv2_jax.sampling import SamplingParams

    SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                   min_p=args.min_p, repetition_penalty=args.repetition_penalty).validate()
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens = {args.max_new_tokens}: expected >= 1")
    if args.coordinator:
        from dsv2_jax.distributed import initialize

        initialize(args.coordinator, args.num_processes, args.process_id)
    if args.model is None:
        from dsv2_jax.demo import demo_model_path

        model_path = demo_model_path()
    else:
        model_path = args.model
    model = dsv2_jax.load(model_path, dtype=args.dtype)
    tok = model.tokenizer
    if tok is None:
        raise ValueError(f"{model_path}: no tokenizer.json/tokenizer_config.json in the model folder")
    kw = _sampling(args)
    if args.chat:
        return _chat(model, tok, args, kw)
    prompt = args.prompt if args.prompt is not None else "ROMEO:"
    source = dict(messages=_with_system(args, [{"role": "user", "content": prompt}])) if args.system \
        else dict(prompts=[prompt])
    if args.json:
        out = dsv2_jax.generate(model, tok, **source, **kw)
        print(json.dumps({"prompt_ids": out.prompt_ids[0], "output_ids": out.token_ids[0],
                          "text": out.texts[0], "finish_reason": out.finish_reasons[0],
                          "prefill_tokens_per_s": out.prefill_tokens_per_s,
                          "decode_tokens_per_s": out.decode_tokens_per_s,
                          "prefill_s": out.prefill_s, "decode_s": out.decode_s}, ensure_ascii=False))
        return 0
    stats: dict = {}
    if not args.system:
        sys.stdout.write(prompt)
    for piece in dsv2_jax.stream(model, tok, **source, **kw, stats=stats):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    _report(stats)
    return 0


def _with_system(args, messages):
    return ([{"role": "system", "content": args.system}] if args.system else []) + messages


def _chat(model, tok, args, kw) -> int:
    import dsv2_jax

    history: list[dict] = []
    print("chat: empty line or Ctrl-D to quit", file=sys.stderr)
    while True:
        try:
            user = input("User: ")
        except EOFError:
            break
        if not user.strip():
            break
        history.append({"role": "user", "content": user})
        stats: dict = {}
        reply = ""
        sys.stdout.write("Assistant: ")
        for piece in dsv2_jax.stream(model, tok, messages=_with_system(args, history), **kw, stats=stats):
            reply += piece
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        _report(stats)
        history.append({"role": "assistant", "content": reply})
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except KeyboardInterrupt:
        return 130
    except (OSError, ValueError) as e:  # bad folder, hub unreachable, bad values: one clear line
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
