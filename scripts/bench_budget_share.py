"""Does budget routing hold its share while decoding? The routed share of generated tokens.

Budget routing promises a share of token-layers on the residual planes (10% by default). A
prefill pass routes exactly its top share; decode decides one token at a time
(tap_runtime.budget). This generates greedily from the first --prompt-tokens tokens of the
held-out text, as bench_speed.py's decode rows do, and prints the share of decode token-layers
routed up, per chunk of --chunk tokens and overall, with the average weight bits read per
token that the generation reports.

    python scripts/bench_budget_share.py --model models/qwen1.5b --tap models/qwen1.5b-tap-lv --texts wikitext,c4

To measure another version of the runtime on the same footing, put its checkout first on the
path: ``PYTHONPATH=/path/to/checkout python scripts/bench_budget_share.py ...``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import tap_runtime  # noqa: E402
from bench_common import environment, heldout_text, set_threads  # noqa: E402
from calibration.data import text_token_ids  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the source model directory (its tokenizer)")
    parser.add_argument("--tap", required=True)
    parser.add_argument("--texts", default="wikitext,c4", help="held-out texts whose start is the prompt")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--chunk", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    set_threads(args.threads)
    from transformers import AutoTokenizer

    tap = tap_runtime.load(args.tap)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    router = tap.router
    decode_flags: list[bool] = []
    route_layer = router.route_layer

    def recording(layer_index, hidden_states, normed=None):
        route_layer(layer_index, hidden_states, normed)
        if hidden_states.shape[0] * hidden_states.shape[1] == 1:
            decode_flags.append(router.layers[layer_index].plane_indices[0] is not None)

    router.route_layer = recording
    print(f"# bench_budget_share: {args.tap} ({tap_runtime.__file__}); routing {router.mode}, shares {router.random_shares}; "
          f"{args.prompt_tokens}-token prompts, {args.new_tokens} greedy tokens")
    print(f"# {environment()}")
    print(f"{'text':9s} {'decode share':>12s} {'avg bits':>8s}  share per {args.chunk} tokens")
    layers = router.num_layers
    for text in args.texts.split(","):
        ids = torch.tensor(text_token_ids(tokenizer, heldout_text(text))[: args.prompt_tokens]).unsqueeze(0)
        decode_flags.clear()
        with torch.inference_mode():
            done = tap.generate(input_ids=ids, max_new_tokens=args.new_tokens, eos_token_id=[])
        steps = [decode_flags[i : i + layers] for i in range(0, len(decode_flags), layers)]
        chunks = [steps[a : a + args.chunk] for a in range(0, len(steps), args.chunk)]
        per_chunk = " ".join(f"{sum(map(sum, c)) / (len(c) * layers):.3f}" for c in chunks)
        print(f"{text:9s} {sum(decode_flags) / len(decode_flags):12.4f} {done.metrics.avg_weight_bits_per_token:8.3f}  {per_chunk}",
              flush=True)


if __name__ == "__main__":
    main()
