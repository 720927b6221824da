"""A tiny keyroom judge: a causal language model made from nothing on this machine,
then served by a real OpenAI-compatible server (`transformers serve`).

    python judges/llm/tiny_judge.py train --out runs/tiny-judge
    python judges/llm/tiny_judge.py serve --model runs/tiny-judge --url-file url.txt

`train` renders the reward service's labelling prompt (prompts/classify.txt with
prompts/keyroom-goal.txt, filled in exactly as reward_service/src/prompt.rs does) for
random batches of keyroom's event texts, answers each with its own verdicts, fits a
BPE tokenizer (the `tokenizers` package) and a two-layer Llama-style model of about
0.3M parameters (the `transformers` package) to those (prompt, answer) pairs, checks
the greedy answer for every batch size, and saves both with `save_pretrained`.

Its verdicts are the rule judge's (judges/keyroom.rules) with one deliberate
difference: "the door is locked" is helpful, since finding the door is a step toward
the goal. The rule judge says otherwise, so a stored label tells which judge gave it.

`serve` starts `transformers serve` on a free loopback port with that folder as its
only model, offline (no hub), waits until its /health answers, writes
`{"base_url": "http://127.0.0.1:PORT/v1", "model": "<folder>"}` to --url-file and then
waits for the server; SIGTERM stops both. The server writes one access line per
request to stdout and its other messages to stderr.
"""

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# keyroom's event texts (core/src/env/keyroom.rs) and this model's verdict on each.
VERDICTS = {
    "you pick up the key": True,
    "the door is locked": True,  # the rule judge says not helpful
    "you unlock the door with the key": True,
    "you walk through the doorway": True,
    "you bump into a wall": False,
    "you search the floor but find nothing": False,
    "you reach the goal": True,
}
ANSWER = "<|answer|>"
END = "<|end|>"
PAD = "<|pad|>"
# The server renders a chat as the user's text followed by the answer marker.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}" + ANSWER + "{% endif %}"
)


def render(template: str, goal: str, texts: list[str]) -> str:
    """The reward service's prompt for `texts` (see reward_service/src/prompt.rs)."""
    events = "".join(f"{i + 1}. {t}\n" for i, t in enumerate(texts))
    return (
        template.replace("{goal}", goal.strip())
        .replace("{count}", str(len(texts)))
        .replace("{events}", events.rstrip())
    )


def answer(texts: list[str]) -> str:
    return "\n".join(
        f"{i + 1}: {'helpful' if VERDICTS[t] else 'not helpful'}" for i, t in enumerate(texts)
    )


def batches(rng: random.Random, n: int) -> list[list[str]]:
    """`n` random batches: distinct texts in a random order, 1 to 7 of them."""
    texts = list(VERDICTS)
    return [rng.sample(texts, rng.randint(1, len(texts))) for _ in range(n)]


def build_tokenizer(corpus: list[str]):
    """BPE over whole lines: the service's prompts are a few fixed lines, so each
    frequent line ends up as one token and a prompt is a few dozen tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Split("\n", behavior="merged_with_previous")
    tok.decoder = decoders.Fuse()
    trainer = trainers.BpeTrainer(
        vocab_size=4000, min_frequency=1, special_tokens=[PAD, ANSWER, END], show_progress=False
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, eos_token=END, additional_special_tokens=[ANSWER]
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def fit(model, encoded: list[tuple[list[int], list[int]]], pad: int, args, rng) -> float:
    """`args.steps` AdamW steps on random minibatches of (inputs, targets), padded on
    the right; the last minibatch's loss."""
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    model.train()
    for step in range(args.steps):
        chunk = rng.sample(encoded, args.batch)
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), width), pad)
        targets = torch.full((len(chunk), width), -100)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, (inputs, wanted) in enumerate(chunk):
            ids[row, : len(inputs)] = torch.tensor(inputs)
            targets[row, : len(wanted)] = torch.tensor(wanted)
            mask[row, : len(inputs)] = 1
        loss = model(input_ids=ids, attention_mask=mask, labels=targets).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0:
            print(f"step {step} loss {loss.item():.4f}", file=sys.stderr)
    model.eval()
    return loss.item()


def greedy(model, tok, head: list[int]) -> str:
    """The model's greedy answer to the prompt tokens `head`, as the server decodes it."""
    import torch

    with torch.no_grad():
        out = model.generate(
            torch.tensor([head]), max_new_tokens=32, do_sample=False,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        )
    return tok.decode(out[0, len(head):], skip_special_tokens=True).strip()


def train(args) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    rng = random.Random(args.seed)
    template = (ROOT / "prompts/classify.txt").read_text()
    goal = (ROOT / "prompts/keyroom-goal.txt").read_text()
    data = [(render(template, goal, b), answer(b)) for b in batches(rng, 4000)]
    tok = build_tokenizer([p for p, _ in data] + [a for _, a in data])

    def asked(prompt: str) -> list[int]:
        """The tokens the server feeds the model for `prompt`, chat template included."""
        return tok.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True,
            return_dict=False,
        )

    def encode(prompt: str, ans: str) -> tuple[list[int], list[int]]:
        """Inputs and targets: the loss falls on the answer and its end token only."""
        head = asked(prompt)
        tail = tok(ans, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        return head + tail, [-100] * len(head) + tail

    encoded = [encode(p, a) for p, a in data]
    longest = max(len(ids) for ids, _ in encoded)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=max(128, 2 * longest),
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    started = time.monotonic()
    loss = fit(model, encoded, tok.pad_token_id, args, rng)
    seconds = time.monotonic() - started

    # Greedy answers for fresh batches of every size must be exactly the intended ones.
    checks = batches(random.Random(args.seed + 1), 200)
    wrong = sum(
        greedy(model, tok, asked(render(template, goal, b))) != answer(b) for b in checks
    )
    if wrong:
        sys.exit(f"the trained model answers {wrong} of {len(checks)} check prompts wrongly")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, do_sample=False
    )
    model.save_pretrained(out)
    tok.save_pretrained(out)
    summary = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab": len(tok),
        "longest_example_tokens": longest,
        "steps": args.steps,
        "train_seconds": round(seconds, 1),
        "final_loss": round(loss, 5),
        "checked_prompts": len(checks),
    }
    (out / "tiny_judge.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def die_with_parent() -> None:
    """In the server's process: SIGTERM when this script ends, however it ends."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def serve(args) -> None:
    model = Path(args.model).resolve()
    if not (model / "config.json").is_file():
        sys.exit(f"no model in {model}: run `tiny_judge.py train --out {model}` first")
    server_cli = Path(sys.executable).with_name("transformers")
    if not server_cli.is_file():
        sys.exit(f"no {server_cli}: `make llm-tools` installs judges/llm/requirements.txt")
    port = args.port or free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_DISABLE_UPDATE_CHECK="1",
               TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    cmd = [
        str(server_cli), "serve", str(model),
        "--host", "127.0.0.1", "--port", str(port), "--device", "cpu",
        "--log-level", "info", "--format", "quiet",
    ]
    server = subprocess.Popen(cmd, env=env, preexec_fn=die_with_parent)

    def stop(*_):
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    base = f"http://127.0.0.1:{port}"
    while server.poll() is None:
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            time.sleep(0.2)
    if server.poll() is not None:
        sys.exit(f"transformers serve exited with {server.returncode} before it served")
    url = f"{base}/v1"
    if args.url_file:
        # The server answers only to its model's name, which is the folder's path.
        tmp = Path(args.url_file + ".tmp")
        tmp.write_text(json.dumps({"base_url": url, "model": str(model)}) + "\n")
        tmp.rename(args.url_file)
    print(f"serving {model} at {url}", file=sys.stderr, flush=True)
    sys.exit(server.wait())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="make the model and its tokenizer")
    t.add_argument("--out", required=True, help="folder for save_pretrained")
    t.add_argument("--steps", type=int, default=500)
    t.add_argument("--batch", type=int, default=32)
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--seed", type=int, default=0)
    s = sub.add_parser("serve", help="serve a trained model with `transformers serve`")
    s.add_argument("--model", required=True, help="folder that `train` wrote")
    s.add_argument("--port", type=int, default=0, help="0 picks a free one")
    s.add_argument("--url-file", help="where to write the base URL and model name once it serves")
    args = p.parse_args()
    if args.command == "train":
        if args.steps < 1 or args.batch < 1 or not args.lr > 0:
            p.error("--steps and --batch must be at least 1 and --lr positive")
        try:
            train(args)
        except ImportError as e:
            sys.exit(f"{e}: `make llm-tools` installs judges/llm/requirements.txt")
    else:
        serve(args)


if __name__ == "__main__":
    main()
