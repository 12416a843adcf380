"""The peer: Hugging Face peft + transformers ``Trainer`` on the benchmark's rows.

Run by ``bench/run.py`` in its own process (so its wall time and peak memory are its own):

    python bench/peer.py CONFIG.json

CONFIG holds: model_dir, quantization ("none" | "nf4"), train (JSONL, completion format),
max_seq_len, r, alpha, dropout, lr, micro_batch_size, seed, out_dir; optional: device ("cpu",
the default, or "cuda") and max_steps (default: one epoch). The rows are tokenised by
peftcli's data module, so both tools train on identical token ids and labels; everything after
that is the peer's own: ``get_peft_model``, ``DataCollatorForSeq2Seq`` padding, full-logits loss,
``Trainer`` at its fastest setting on the device: on the CPU ``bf16=True`` (autocast) where the
CPU has bf16 units, else float32 throughout (bf16 is emulated there, 10-17x slower), decided by
the function that resolves our ``auto`` (:func:`peftcli.precision.choose`, so ``PEFTCLI_CPU_BF16=0``
puts both tools in float32); on CUDA bf16 autocast where the GPU supports bf16, else fp16 (NF4
computing in that dtype). The base is loaded in float32 either way, as in every earlier run.
Writes ``out_dir/adapter/`` and ``out_dir/peer.json`` (train_runtime_s, steps, train_loss,
process_s; step_end_s: ``time.perf_counter()`` at each optimizer step's end, after a CUDA
synchronise; cuda_peak_memory_gib: ``torch.cuda.max_memory_allocated()`` on CUDA, else null;
precision: bf16, base_dtype, reason).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

T_START = time.perf_counter()


def main(config_path: str) -> None:
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    from peftcli import data, models, precision
    from peftcli.recipe import DataSource

    cfg = json.loads(Path(config_path).read_text())
    out = Path(cfg["out_dir"])
    tok = models.load_tokenizer(cfg["model_dir"])
    rows = data.load_rows(DataSource(path=cfg["train"], format="completion"))
    examples, _ = data.tokenize_rows(rows, "completion", tok, cfg["max_seq_len"], False, cfg["train"])
    train_set = Dataset.from_list([{"input_ids": e["input_ids"], "attention_mask": [1] * len(e["input_ids"]),
                                    "labels": e["labels"]} for e in examples])

    cuda = cfg.get("device", "cpu") == "cuda"
    if cuda:  # bf16 autocast; fp16 on a GPU without bf16
        bf16, reason = torch.cuda.is_bf16_supported(), "CUDA"
    else:  # the peer's fastest setting on this CPU
        chosen = precision.choose("auto", "auto", "cpu")
        bf16, reason = chosen.autocast == "bf16", chosen.reason
    compute = (torch.bfloat16 if bf16 else torch.float16) if cuda else torch.float32  # NF4's compute dtype
    kwargs = {"dtype": torch.float32}
    if cfg["quantization"] == "nf4":
        kwargs.update(device_map={"": "cuda:0" if cuda else "cpu"}, quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute))
    model = AutoModelForCausalLM.from_pretrained(cfg["model_dir"], **kwargs)
    if cfg["quantization"] == "nf4":
        # the usual QLoRA preparation, without gradient checkpointing (neither tool uses it here)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, LoraConfig(r=cfg["r"], lora_alpha=cfg["alpha"], lora_dropout=cfg["dropout"],
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    args = TrainingArguments(
        output_dir=str(out / "trainer"), per_device_train_batch_size=cfg["micro_batch_size"],
        gradient_accumulation_steps=1, num_train_epochs=1, learning_rate=cfg["lr"], lr_scheduler_type="cosine",
        warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, bf16=bf16, fp16=cuda and not bf16, use_cpu=not cuda,
        seed=cfg["seed"], max_steps=cfg.get("max_steps", -1), logging_steps=10, save_strategy="no", report_to=[],
        dataloader_num_workers=0, remove_unused_columns=False, disable_tqdm=True)
    collator = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
    step_end_s: list[float] = []

    class StepTimes(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            step_end_s.append(time.perf_counter())

    trainer = Trainer(model=model, args=args, train_dataset=train_set, data_collator=collator, callbacks=[StepTimes()])
    result = trainer.train()
    model.save_pretrained(out / "adapter")
    (out / "peer.json").write_text(json.dumps({
        "train_runtime_s": result.metrics["train_runtime"], "steps": result.global_step,
        "train_loss": result.training_loss, "process_s": time.perf_counter() - T_START, "step_end_s": step_end_s,
        "cuda_peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "precision": {"bf16": bf16, "base_dtype": "float32", "reason": reason}}))


if __name__ == "__main__":
    main(sys.argv[1])
