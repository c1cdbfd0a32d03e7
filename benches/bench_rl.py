"""One GRPO (ReRe) step split into rollout and update, and rollouts/s of our engine vs HF generate
with the Python dict callback (how MiniOneRec and ReRe roll out), measured in the same run.

A step = rollout (one constrained beam search per prompt, B beams = the group) + rewards and
group advantages + update (reference log-probs, policy log-probs with gradient, clipped policy
loss + β·k3 KL, backward, AdamW step). The update runs as the trainer's does (each prompt once, its
K/V repeated for its group: ``grouped_sequence_logprobs``) and, timed beside it, with each prompt
repeated for every beam (``update_s_repeated_prompts``; ``update_speedup_grouped`` the ratio). The HF rollout is
``generate(num_beams=B, num_return_sequences=B, prefix_allowed_tokens_fn=dict lookup)``; the
rows report both rollouts, the update, and the step time each rollout engine gives; also our rollout
with ``shared_prefix=True`` (the prompt's K/V once per group, not per beam) and, on GPU, with
``cuda_graphs=True`` without and with the shared prefix (graphs captured in its warm-up; the optimizer
updates the weights in place between rollouts, which the replays read); each with its ratio over
our default rollout (``<name>_over_ours``). One of these that crashes is FAILED, and the other columns stand.

CPU setting: tiny random Qwen2, 8 prompts x 16 beams over 3k items, prompt 64, fp32, 1 thread
(``--threads N`` overrides). GPU setting: Qwen2.5-0.5B shapes with random weights, bf16, 8 prompts
x 16 beams over 3.7k items, prompt 128. L = 3 levels of 256 codes. Models, catalogues and the HF
baseline come from bench_decode.py.

After the timings (same weights for both) our rollout's groups are compared with HF's:
same_set_groups_as_hf, the share of groups with the same B SIDs, and same_set_as_hf, the share of
the B SIDs per group that both hold (bench_decode's metric). Checks (a missed one prints a FAILED
line, is in the JSON's "failed" and makes the exit status 1): invalid_rate == 0 (our rollouts are
SIDs of the catalogue); fp32: same_set_groups_as_hf == 1; bf16: same_set_as_hf >= 0.95 (near-ties:
one swapped SID changes a whole group, and 8 groups leave no room under 1); the same for each of
our other rollouts; the grouped and the repeated-prompt sequence log-probs of the last rollout within
1e-4 (fp32) / 0.25 (bf16) of each other (grouped_logp_max_abs_diff).

  python benches/bench_rl.py [--device cpu|cuda] [--json PATH] [--threads N]
"""
from __future__ import annotations

import copy
import functools
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from genrec_fast import SIDTrie  # noqa: E402
from genrec_fast.decode import beam_search  # noqa: E402
from genrec_fast.train import (  # noqa: E402
    clipped_policy_loss,
    group_advantages,
    group_rewards,
    grouped_sequence_logprobs,
    k3_kl,
    make_reward,
    sequence_logprobs,
)

from bench_decode import (  # noqa: E402
    CPU_MODEL,
    GPU_MODEL,
    SIZES,
    build_model,
    hf_codes,
    hf_generate,
    invalid_rate,
    prefix_dict,
    prompts,
    random_catalogue,
    same_set,
    same_set_prompts,
)
from common import Checks, bench_parser, print_table, sync, timeit, write_json  # noqa: E402

# device type -> (prompts per step, beams, items, prompt length, repeats of the HF rollout, repeats of ours)
SETTINGS = {
    "cpu": (8, 16, 3000, 64, 3, 5),
    "cuda": (8, 16, 3700, 128, 3, 10),
}


# device type -> our other rollouts: name -> beam_search options (each timed, compared with HF and gated as ours)
VARIANTS = {
    "cpu": {"shared": {"shared_prefix": True}},
    "cuda": {"graphs": {"cuda_graphs": True}, "shared": {"shared_prefix": True},
             "shared_graphs": {"shared_prefix": True, "cuda_graphs": True}},
}
ALL_VARIANTS = ("graphs", "shared", "shared_graphs")


def run(device: torch.device) -> dict:
    groups, beams, items, length, hf_repeat, our_repeat = SETTINGS[device.type]
    spec = GPU_MODEL if device.type == "cuda" else CPU_MODEL
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    policy, vocab = build_model(spec, device, dtype)
    reference = copy.deepcopy(policy).requires_grad_(False)
    policy.train()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-6)
    codes = random_catalogue(items, seed=1)
    trie = SIDTrie(codes, SIZES)
    allowed = prefix_dict(codes, vocab)
    ids, mask = prompts(groups, length, spec["base_vocab"], device, seed=2)
    targets = np.random.default_rng(3).integers(0, items, groups).tolist()
    reward_fn = make_reward("ranking")
    L = len(SIZES)
    state = {}

    def rollout(**options):
        policy.eval()
        with torch.no_grad():
            state["res"] = beam_search(policy, ids, mask, trie, vocab, beams, score="full_vocab", **options)
        policy.train()

    def hf_rollout():
        policy.eval()
        with torch.no_grad():
            state["hf"] = hf_generate(policy, ids, mask, beams, L, allowed)
        policy.train()

    def compare(prefix: str) -> dict:
        """Our last rollout against HF's last one (no update in between: same weights)."""
        ours = state["res"].codes.cpu()
        hf = hf_codes(state["hf"].reshape(groups, beams, L), vocab, L)
        return {f"{prefix}same_set_groups_as_hf": same_set_prompts(ours, hf),
                f"{prefix}same_set_as_hf": same_set(ours, hf), f"{prefix}invalid_rate": invalid_rate(ours, trie)}

    def update(grouped=True):
        grpo_update(policy, reference, optimizer, ids, mask, state["res"], targets, vocab, reward_fn, grouped)

    t_ours = timeit(rollout, device, repeat=our_repeat, warmup=2)
    t_update = timeit(update, device, repeat=our_repeat, warmup=1)
    t_update_repeated = timeit(functools.partial(update, grouped=False), device, repeat=our_repeat, warmup=1)
    t_hf = timeit(hf_rollout, device, repeat=hf_repeat, warmup=1)
    rollout()
    same = compare("")
    same["grouped_logp_max_abs_diff"] = grouped_logp_diff(policy, ids, mask, vocab.token_ids(
        state["res"].codes.reshape(-1, L).cpu()).to(device).view(groups, beams, L))
    seqs = groups * beams
    variants, errors = {}, {}
    for name, options in VARIANTS[device.type].items():
        try:  # a capture or the shared-prefix path failing is reported; the other columns stand
            t = timeit(functools.partial(rollout, **options), device, repeat=our_repeat, warmup=2)
        except Exception as err:  # noqa: BLE001 - printed, in the JSON, and the exit status is 1
            errors[name] = f"{type(err).__name__}: {err}"
            traceback.print_exc()
            print(f"rollout {name} failed: {errors[name]}", file=sys.stderr)
            policy.train()
            continue
        variants.update({f"rollout_s_ours_{name}": t, f"rollout_speedup_{name}": t_hf / t,
                         f"step_speedup_{name}": (t_hf + t_update) / (t + t_update),
                         f"{name}_over_ours": t_ours / t, **compare(f"{name}_")})
    return {**same, **variants,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).replace("torch.", ""), "prompts": groups, "beams": beams, "items": items,
        "prompt_len": length,
        "rollout_s_ours": t_ours, "rollout_s_hf_callback": t_hf, "update_s": t_update,
        "update_s_repeated_prompts": t_update_repeated, "update_speedup_grouped": t_update_repeated / t_update,
        "step_s_ours": t_ours + t_update, "step_s_hf_callback": t_hf + t_update,
        "rollouts_per_s_ours": seqs / t_ours, "rollouts_per_s_hf_callback": seqs / t_hf,
        "rollout_speedup": t_hf / t_ours, "step_speedup": (t_hf + t_update) / (t_ours + t_update),
        **({"errors": errors} if errors else {}),
    }


def grpo_update(policy, reference, optimizer, ids, mask, res, targets, vocab, reward_fn, grouped=True) -> None:
    """One GRPO update on the rollout ``res`` ([G, B] beams): ranking rewards, group advantages, reference and
    policy log-probs, clipped loss + k3 KL, backward, clip, AdamW. ``grouped``: each prompt once, its K/V repeated
    for its group (as the trainer); else each prompt repeated for every beam."""
    groups, beams, L = res.codes.shape
    rewards = group_rewards(reward_fn, res.item_ids, targets)
    adv = group_advantages(rewards).flatten().to(ids.device)
    responses = vocab.token_ids(res.codes.reshape(-1, L).cpu()).to(ids.device)
    if grouped:
        responses = responses.view(groups, beams, L)
        with torch.no_grad():
            ref = grouped_sequence_logprobs(reference, ids, mask, responses).flatten()
        logps = grouped_sequence_logprobs(policy, ids, mask, responses).flatten()
    else:
        rep_ids, rep_mask = ids.repeat_interleave(beams, 0), mask.repeat_interleave(beams, 0)
        with torch.no_grad():
            ref = sequence_logprobs(reference, rep_ids, rep_mask, responses)
        logps = sequence_logprobs(policy, rep_ids, rep_mask, responses)
    pg, _ = clipped_policy_loss(logps, logps.detach(), adv, 0.2)
    loss = (pg + 0.04 * k3_kl(logps, ref)).mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def grouped_logp_diff(model, ids, mask, responses) -> float:
    """max |grouped - repeated-prompt| sequence log-prob of the [G, B, L] responses (no grad): the update's two
    forms compute the same thing."""
    G, B, L = responses.shape
    with torch.no_grad():
        grouped = grouped_sequence_logprobs(model, ids, mask, responses).flatten()
        repeated = sequence_logprobs(model, ids.repeat_interleave(B, 0), mask.repeat_interleave(B, 0),
                                     responses.reshape(G * B, L))
    return float((grouped - repeated).abs().max())


def check_row(row) -> Checks:
    """The gates of the module doc."""
    checks, setting = Checks(), f"rl_{row['prompts']}x{row['beams']}_{row['dtype']}"
    limit = 1e-4 if row["dtype"] == "float32" else 0.25  # bf16: the two forward shapes round differently
    for name, err in row.get("errors", {}).items():
        checks.error(setting, name, err)
    checks.check(setting, "grouped_logp_max_abs_diff", row["grouped_logp_max_abs_diff"], "<=", limit)
    for prefix in ("", *(f"{name}_" for name in ALL_VARIANTS)):
        if f"{prefix}invalid_rate" not in row:
            continue
        checks.check(setting, f"{prefix}invalid_rate", row[f"{prefix}invalid_rate"], "==", 0.0)
        if row["dtype"] == "float32":
            checks.check(setting, f"{prefix}same_set_groups_as_hf", row[f"{prefix}same_set_groups_as_hf"], "==", 1.0)
        else:
            checks.check(setting, f"{prefix}same_set_as_hf", row[f"{prefix}same_set_as_hf"], ">=", 0.95)
    return checks


def main(argv=None) -> int:
    p = bench_parser(__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (CPU setting only)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type not in SETTINGS:
        raise SystemExit(f"bench_rl: no setting for device type {device.type!r}")
    if device.type == "cpu":  # one thread: stable numbers on a small shared box (as bench_decode / bench_beam)
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    row = run(device)
    sync(device)
    cols = ["prompts", "beams", "items", "rollout_s_ours", "rollout_s_hf_callback", "update_s",
            "update_s_repeated_prompts", "update_speedup_grouped", "step_s_ours",
            "step_s_hf_callback", "rollouts_per_s_ours", "rollouts_per_s_hf_callback", "rollout_speedup",
            "step_speedup"]
    cols += [k for name in ALL_VARIANTS for k in (f"rollout_s_ours_{name}", f"rollout_speedup_{name}",
                                                   f"step_speedup_{name}", f"{name}_over_ours") if k in row]
    cols += ["grouped_logp_max_abs_diff"]
    cols += [f"{prefix}{k}" for prefix in ("", *(f"{name}_" for name in ALL_VARIANTS))
             for k in ("same_set_groups_as_hf", "same_set_as_hf", "invalid_rate") if f"{prefix}{k}" in row]
    print_table([{k: row[k] for k in cols}],
                title=f"GRPO step ({row['device']}, {row['dtype']})")
    checks = check_row(row)
    print(f"total {time.perf_counter() - t0:.1f}s")
    write_json("bench_rl", {"bench": "rl", "rows": [row], **checks.payload()}, args.json)
    return checks.report()


if __name__ == "__main__":
    sys.exit(main())
