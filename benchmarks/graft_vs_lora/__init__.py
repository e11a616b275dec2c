"""Grafts vs LoRA, QLoRA and VeRA on a real model and real text: loss gain, parameters, bytes, speed, memory.

Laid out like PEFT's method_comparison: experiments/<method>/ holds one method's adapter_config.json and
training_params.json; `run.py` trains and measures (one result file per run, see store.py); `report.py` reads the
result files, judges targets.json and writes the table, the plot and the README's numbers. Run from the repo root:

    python -m benchmarks.graft_vs_lora.run --all --resume && python -m benchmarks.graft_vs_lora.report

Protocol (protocol.json; identical for every method):
- Model: SmolLM2-135M-Instruct from `peft_graft.testing.assets.smollm2_path()` (fp32; the nf4 base loads the same
  fp32 folder with a bitsandbytes NF4 config, compute dtype fp32). Text: `load_corpus("news")` with its fixed,
  disjoint train / validation / test splits (by article, hashed), packed into blocks of seq_len tokens.
- Training: each method's target modules (its adapter_config.json), the same steps, batch and sequence length;
  AdamW (weight decay 0), constant learning rate, gradient-norm clip 1.0.
- Learning rate: each method picks the best of its own small grid (training_params.json) by validation loss after a
  run with the tuning seed 0; the test split is never used for that choice. While the best lr sits at the edge of
  the grid, the grid is extended one step in that direction (lr_extensions times at most); an lr still at the edge is
  marked with '*'.
- Reported: test loss gain over the method's own base (fp32 or nf4) in nats/token, from `seeds` fresh runs (seeds
  1..N, none of them the tuning run) at the chosen lr: mean and 95% Student-t interval over seeds. A seed draws which
  training blocks are used and in which order, and every random init: torch's global generator (LoRA's A), VeRA's
  projection_prng_key, GraftConfig(seed=...) (orthogonal/trainable projections). SVD-projection grafts start from
  Φ = 0 deterministically, so for them the seed changes the data only. The same seed gives every method the same
  data order, so gains are compared pairwise across seeds.
- Configs that need calibration (projection="gradient") place A/B on the top singular vectors of the loss gradient
  of each target weight, summed over calibration_batches training batches drawn by the seed (`peft_graft.calibrate`,
  before training): that many extra forward/backward passes that the other methods do not spend. Configs with
  "calibration": "first_step" (or "first_steps" and calibration_steps k) take them from the first training
  step's (steps') own gradient instead (`peft_graft.CalibratingSteps`): no extra passes; those steps' extra time
  counts in their compute.
- Speed / memory / bytes / latency: per adapter, a fresh process (probe.py): peak tensor memory over 3 training steps
  (model tensors + peak live allocations from torch's profiler; this is what the memory target is judged on) and peak
  RSS (Linux VmHWM reset before training, for reference), adapter_model.safetensors size, median step time with
  steps alternated against the base's timing reference (LoRA r=8, or QLoRA r=8 on the nf4 base), eval-mode forward
  latency of one sequence, alternated with the plain base and the reference, unmerged and after merge_and_unload().
- Quick mode (--quick): the same code path on a tiny random Llama and synthetic Zipf tokens, a subset of methods,
  fewer steps and seeds, probes in-process (protocol.json's "quick" section); results go to a temp dir, never to
  benchmarks/results/.
"""
