"""Generate text from a DeepSeek-V2 checkpoint: ``python -m infer.generate``.

    python -m infer.generate                                  # the bundled demo model
    python -m infer.generate --model deepseek-ai/DeepSeek-V2-Lite-Chat --chat
    python -m infer.generate --model ./my-model --prompt "ROMEO:" --temperature 0.8 --json
    python -m infer.generate --model ./base --adapter ./my-lora-adapter --chat

Text streams to stdout as it is generated (``--json``: one JSON object); everything else
(prefill and decode tokens/s, messages, logs of native libraries such as Gloo's) goes to stderr.

Across devices and processes (``dsv2_jax.sharding``, ``dsv2_jax.distributed``)::

    python -m infer.generate --model ./my-model --expert 8          # routed experts over 8 devices
    python -m infer.generate --model ./my-model --expert 4 --coordinator 10.0.0.1:12355 \
        --num-processes 2 --process-id RANK                        # in each of two processes

``--expert N`` / ``--fsdp N`` load the model straight into a (data, fsdp, expert) mesh over
every device (data takes the devices left over); each process reads only its own experts and
shards. Every process runs the same command; only process 0 prints.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m infer.generate", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", help="model folder or hub repo id (default: the bundled demo model)")
    p.add_argument("--adapter", help="a LoRA adapter folder (Hugging Face PEFT format) for the model")
    p.add_argument("--prompt", default="ROMEO:", help="prompt text")
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
    p.add_argument("--expert", type=int, default=1, metavar="N",
                   help="split the routed experts over N devices (must divide n_routed_experts)")
    p.add_argument("--fsdp", type=int, default=1, metavar="N",
                   help="split every weight's hidden-size axis over N devices")
    from dsv2_jax.distributed import add_arguments

    add_arguments(p)
    return p.parse_args(argv)


def _sampling(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                seed=args.seed, stop=args.stop, ignore_eos=args.ignore_eos)


def _report(stats: dict) -> None:
    note = " (prefill includes compilation)" if stats.get("compiled") else ""
    print(f"\n[prefill {stats['prefill_tokens_per_s']:.1f} tok/s, "
          f"decode {stats['decode_tokens_per_s']:.1f} tok/s{note}]", file=sys.stderr)


def _mesh(args):
    """The mesh to load into, or None (one device): --expert / --fsdp > 1, or a multi-process
    run (jax.distributed initialized here first)."""
    for flag, n in (("--expert", args.expert), ("--fsdp", args.fsdp)):
        if n < 1:
            raise ValueError(f"{flag} = {n}: expected a positive integer")
    from dsv2_jax.distributed import join

    multi_process = join(args.coordinator, args.num_processes, args.process_id)
    if args.expert == 1 and args.fsdp == 1 and not multi_process:
        return None
    from dsv2_jax import sharding

    return sharding.make_mesh(expert=args.expert, fsdp=args.fsdp)


def run(args, out) -> int:
    """Generate as ``args`` say; results go to ``out``, everything else to stderr."""
    import dsv2_jax
    from dsv2_jax.sampling import SamplingParams

    SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                   min_p=args.min_p, repetition_penalty=args.repetition_penalty).validate()
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens = {args.max_new_tokens}: expected >= 1")
    if args.chat and args.json:
        raise ValueError("--json prints one prompt's result as one JSON object; it does not apply "
                         "to --chat (use --prompt with --json)")
    if args.dtype == "float16":
        print("warning: --dtype float16: DeepSeek-V2's activations exceed float16's range (the "
              "reference runs in bfloat16); expect inf/NaN logits. Use bfloat16 or float32.",
              file=sys.stderr)
    mesh = _mesh(args)
    import jax

    lead = jax.process_index() == 0  # every process computes; process 0 alone prints
    if args.chat and jax.process_count() > 1:
        raise ValueError("--chat reads stdin, which only one process has: use --prompt in "
                         "multi-process runs")
    if args.model is None:
        from dsv2_jax.demo import demo_model_path

        model_path = demo_model_path()
    else:
        model_path = args.model
    model = dsv2_jax.load(model_path, dtype=args.dtype, mesh=mesh, adapter=args.adapter)
    if mesh is not None and lead:
        layout = ", ".join(f"{k} {v}" for k, v in mesh.shape.items() if v > 1) or "one device"
        print(f"mesh: {layout} ({jax.device_count()} devices, {jax.process_count()} "
              f"process(es))", file=sys.stderr)
    tok = model.tokenizer
    if tok is None:
        raise ValueError(f"{model_path}: no tokenizer.json/tokenizer_config.json in the model folder")
    kw = _sampling(args)
    if args.chat:
        return _chat(model, tok, args, kw, out)
    prompt = args.prompt
    source = dict(messages=_with_system(args, [{"role": "user", "content": prompt}])) if args.system \
        else dict(prompts=[prompt])
    if args.json:
        res = dsv2_jax.generate(model, tok, **source, **kw)
        if lead:
            print(json.dumps({"prompt_ids": res.prompt_ids[0], "output_ids": res.token_ids[0],
                              "text": res.texts[0], "finish_reason": res.finish_reasons[0],
                              "prefill_tokens_per_s": res.prefill_tokens_per_s,
                              "decode_tokens_per_s": res.decode_tokens_per_s,
                              "prefill_s": res.prefill_s, "decode_s": res.decode_s,
                              "includes_compilation": res.compiled},
                             ensure_ascii=False), file=out)
        return 0
    stats: dict = {}
    pieces = dsv2_jax.stream(model, tok, **source, **kw, stats=stats)  # validates, prefills
    if lead and not args.system:
        out.write(prompt)
    for piece in pieces:
        if lead:
            out.write(piece)
            out.flush()
    if lead:
        out.write("\n")
        _report(stats)
    return 0


def _with_system(args, messages):
    return ([{"role": "system", "content": args.system}] if args.system else []) + messages


def _fit_context(tok, args, history: list[dict], context: int) -> bool:
    """Drop the oldest turns until the conversation plus ``--max-new-tokens`` fits the model's
    context (saying so on stderr); False when the newest message alone does not fit."""
    def length():
        return len(tok.apply_chat_template(_with_system(args, history), add_generation_prompt=True,
                                           tokenize=True))

    dropped = 0
    while length() + args.max_new_tokens > context and len(history) > 1:
        del history[:2 if len(history) > 2 else 1]  # a user turn and its reply
        dropped += 1
    if length() + args.max_new_tokens > context:
        print(f"[this message and --max-new-tokens {args.max_new_tokens} do not fit the context of "
              f"{context} tokens: not sent]", file=sys.stderr)
        history.pop()
        return False
    if dropped:
        print(f"[dropped the {dropped} oldest turn(s) to fit the context of {context} tokens]",
              file=sys.stderr)
    return True


def _chat(model, tok, args, kw, out) -> int:
    """A multi-turn chat on stdin. A turn that would overflow the context drops the oldest
    turns (or, alone too long, is not sent); Ctrl-C during a reply stops that reply, and
    the chat goes on; Ctrl-C at the prompt, an empty line or Ctrl-D ends it."""
    import dsv2_jax

    history: list[dict] = []
    context = model.config.max_position_embeddings
    print("chat: empty line or Ctrl-D to quit; Ctrl-C stops a reply", file=sys.stderr)
    while True:
        try:
            user = input("User: ")
        except (EOFError, KeyboardInterrupt):
            break
        if not user.strip():
            break
        history.append({"role": "user", "content": user})
        if not _fit_context(tok, args, history, context):
            continue
        stats: dict = {}
        reply = ""
        # Ctrl-C during a reply sets a flag that the stream reads before each token, rather than
        # raising KeyboardInterrupt wherever the signal lands (inside JAX's dispatch or
        # compilation, where an exception raised in a callback can be swallowed and the reply
        # then ran to its end: seen once in CI).
        interrupted = threading.Event()
        previous = signal.signal(signal.SIGINT, lambda *_: interrupted.set())
        out.write("Assistant: ")
        out.flush()  # the label shows at once, before prefill and the first printable token
        try:
            for piece in dsv2_jax.stream(model, tok, messages=_with_system(args, history), **kw,
                                         stats=stats, interrupted=interrupted.is_set):
                reply += piece
                out.write(piece)
                out.flush()
        finally:
            signal.signal(signal.SIGINT, previous)
        out.write("\n")
        if interrupted.is_set():
            print("[reply stopped]", file=sys.stderr)
        else:
            _report(stats)
        history.append({"role": "assistant", "content": reply})
    return 0


def main(argv=None) -> int:
    from dsv2_jax.distributed import results_stdout

    args = parse_args(argv)
    try:
        with results_stdout() as out:
            return run(args, out)
    except KeyboardInterrupt:
        return 130
    except (OSError, ValueError) as e:  # bad folder, hub unreachable, bad values: one clear line
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
