"""The working set of one real-width transformer block at the real token count, beside placement.py's formula.

Builds the full-size transformer (hidream_edit/full_size.py, real configuration) cut to one double- and one
single-stream block, makes its random weights in host memory in the dtype asked, installs the project's
attention processor, and runs one forward pass with the inputs of an E1.1 edit step at 1024 x 1024: source
latents appended along the width (8192 image tokens, max_seq), 128 T5 and 128 Llama tokens, `--batch`
branches (an edit step has 3). Measured on the CPU with the host's peak RSS, two ways: Linux's VmHWM (reset
when a block starts, read when it ends) and the RSS sampled every 2 ms; a block's working set is the higher
peak less the RSS at its start (CPU tensors of this size are mapped and unmapped on allocation and free, so
RSS follows the live tensors). The formula's activation term (placement.working_set) is printed beside it.

    python benchmarks/block_working_set.py --dtype fp32 --batch 3 [--threads 2] [--json PATH]
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hidream_edit.config import OneLineArgumentParser, at_least_one  # noqa: E402  (after the path insert)


def main() -> int:
    parser = OneLineArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32")
    parser.add_argument("--batch", type=at_least_one("--batch"), default=3, help="branches (an edit step has 3)")
    parser.add_argument("--threads", type=at_least_one("--threads"), default=2)
    parser.add_argument("--json", metavar="PATH", help="also write the figures to PATH (a new file)")
    args = parser.parse_args()

    import torch

    from device_utils import DeviceManager, host_memory, host_peak_rss, reset_host_peak
    from hidream_edit.attention import install_attention
    from hidream_edit.editor import check_new_file, write_new_json
    from hidream_edit.full_size import SPEC, build_on_meta, cut_configs, materialize, module_sizes
    from hidream_edit.placement import gib, working_set
    from hidream_edit.spec import REAL_CONFIGS, TEXT_TOKENS

    path = check_new_file(args.json) if args.json else None
    if not reset_host_peak():
        parser.error("needs Linux's /proc/self/clear_refs to measure a peak per block")
    torch.set_num_threads(args.threads)
    dm = DeviceManager("cpu", args.dtype)
    configs, _ = cut_configs(REAL_CONFIGS, 1)
    modules = build_on_meta(configs)
    transformer = modules["transformer"]
    materialize("transformer", transformer, torch.device("cpu"), dm.dtype, seed=3)
    transformer.max_seq = SPEC.max_seq
    install_attention(transformer, dm, "sdpa")
    sizes = module_sizes(modules, args.dtype)
    del modules

    side = 1024 // 8  # latent side of a 1024 x 1024 source
    batch, dtype = args.batch, dm.dtype
    generator = torch.Generator().manual_seed(0)

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(dtype)

    t5_width = configs["t5"]["d_model"]
    llama_width = configs["llama"]["hidden_size"]
    inputs = {
        "hidden_states": normal(batch, 16, side, 2 * side),
        "timesteps": torch.full((batch,), 500.0),
        "encoder_hidden_states_t5": normal(batch, 128, t5_width),
        "encoder_hidden_states_llama3": normal(configs["llama"]["num_hidden_layers"], batch, 128, llama_width),
        "pooled_embeds": normal(batch, transformer.config.text_emb_dim),
    }
    figures: dict[str, dict[str, Any]] = {}
    starts: dict[str, tuple[int, float]] = {}
    highest = [0]  # the forward's peak RSS, kept across the blocks' own peak windows
    sampled = [0]  # the highest RSS the sampler saw in the current window
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.is_set():
            sampled[0] = max(sampled[0], host_memory()[0])
            time.sleep(0.002)

    def window_peak() -> int:
        return max(host_peak_rss(), sampled[0])

    def before(name: str) -> Any:
        def hook(module: Any, hook_args: Any) -> None:
            highest[0] = max(highest[0], window_peak())
            reset_host_peak()
            sampled[0] = 0
            starts[name] = (host_memory()[0], time.perf_counter())

        return hook

    def after(name: str) -> Any:
        def hook(module: Any, hook_args: Any, output: Any) -> None:
            start, started = starts[name]
            peak = window_peak()
            highest[0] = max(highest[0], peak)
            figures[name] = {"working_set": peak - start, "vmhwm_working_set": host_peak_rss() - start,
                             "sampled_working_set": sampled[0] - start, "seconds": time.perf_counter() - started}

        return hook

    for name, block in (("double-stream block", transformer.double_stream_blocks[0]),
                        ("single-stream block", transformer.single_stream_blocks[0])):
        block.register_forward_pre_hook(before(name))
        block.register_forward_hook(after(name))
    reset_host_peak()
    start, started = host_memory()[0], time.perf_counter()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    with torch.inference_mode():
        transformer(**inputs, return_dict=False)
    highest[0] = max(highest[0], window_peak())
    sampling.set()
    sampler.join()
    figures["whole forward"] = {"working_set": highest[0] - start, "seconds": time.perf_counter() - started}

    per_branch = SPEC.max_seq + TEXT_TOKENS
    predicted = working_set(SPEC, args.dtype, "sdpa", sizes.dims).activations * batch // 3
    per_token_width = batch * per_branch * (4 if args.dtype == "fp32" else 2) * sizes.dims.width
    print(f"one forward of the real-width transformer cut to 1 + 1 blocks: {args.dtype}, batch {batch} x "
          f"{per_branch} tokens, CPU ({args.threads} threads); working set = peak RSS (VmHWM) less RSS at start")
    for name, measured in figures.items():
        measured["formula_activations"] = predicted
        measured["ratio"] = round(measured["working_set"] / predicted, 3)
        measured["model_widths_per_token"] = round(measured["working_set"] / per_token_width, 2)
        print(f"  {name:<20} {gib(measured['working_set']):>9} measured, formula {gib(predicted)} "
              f"(ratio {measured['ratio']:.2f}; {measured['model_widths_per_token']:.1f} values of width "
              f"{sizes.dims.width} per token), {measured['seconds']:.0f} s")
    if path is not None:
        write_new_json(path, {"dtype": args.dtype, "batch": batch, "tokens_per_branch": per_branch,
                              "threads": args.threads, "figures": figures})
    return 0


if __name__ == "__main__":
    sys.exit(main())
