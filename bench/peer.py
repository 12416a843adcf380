"""The peer: Hugging Face peft + transformers ``Trainer`` on the benchmark's rows.

Run by ``bench/run.py`` in its own process (so its wall time and peak memory are its own):

    python bench/peer.py CONFIG.json

CONFIG holds: model_dir, quantization ("none" | "nf4"), train (JSONL, completion format),
max_seq_len, r, alpha, dropout, lr, micro_batch_size, seed, out_dir. The rows are tokenised by
peftcli's data module, so both tools train on identical token ids and labels; everything after
that is the peer's own: ``get_peft_model``, ``DataCollatorForSeq2Seq`` padding, full-logits loss,
``Trainer`` on the CPU at its fastest setting there: ``bf16=True`` (autocast) where the CPU has
bf16 units, else float32 throughout (bf16 is emulated there, 10-17x slower), decided by the
function that resolves our ``auto`` (:func:`peftcli.precision.choose`, so ``PEFTCLI_CPU_BF16=0``
puts both tools in float32). The base is loaded in float32 either way, as in every earlier run.
Writes ``out_dir/adapter/`` and ``out_dir/peer.json`` (train_runtime_s, steps, train_loss,
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
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from peftcli import data, models, precision
    from peftcli.recipe import DataSource

    cfg = json.loads(Path(config_path).read_text())
    chosen = precision.choose("auto", "auto", "cpu")  # the peer's fastest setting on this CPU
    bf16 = chosen.autocast == "bf16"
    out = Path(cfg["out_dir"])
    tok = models.load_tokenizer(cfg["model_dir"])
    rows = data.load_rows(DataSource(path=cfg["train"], format="completion"))
    examples, _ = data.tokenize_rows(rows, "completion", tok, cfg["max_seq_len"], False, cfg["train"])
    train_set = Dataset.from_list([{"input_ids": e["input_ids"], "attention_mask": [1] * len(e["input_ids"]),
                                    "labels": e["labels"]} for e in examples])

    kwargs = {"dtype": torch.float32}
    if cfg["quantization"] == "nf4":
        kwargs.update(device_map={"": "cpu"}, quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32))
    model = AutoModelForCausalLM.from_pretrained(cfg["model_dir"], **kwargs)
    if cfg["quantization"] == "nf4":
        # the usual QLoRA preparation, without gradient checkpointing (neither tool uses it here)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, LoraConfig(r=cfg["r"], lora_alpha=cfg["alpha"], lora_dropout=cfg["dropout"],
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    args = TrainingArguments(
        output_dir=str(out / "trainer"), per_device_train_batch_size=cfg["micro_batch_size"],
        gradient_accumulation_steps=1, num_train_epochs=1, learning_rate=cfg["lr"], lr_scheduler_type="cosine",
        warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, bf16=bf16, use_cpu=True, seed=cfg["seed"],
        logging_steps=10, save_strategy="no", report_to=[], dataloader_num_workers=0, remove_unused_columns=False,
        disable_tqdm=True)
    collator = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
    trainer = Trainer(model=model, args=args, train_dataset=train_set, data_collator=collator)
    result = trainer.train()
    model.save_pretrained(out / "adapter")
    (out / "peer.json").write_text(json.dumps({
        "train_runtime_s": result.metrics["train_runtime"], "steps": result.global_step,
        "train_loss": result.training_loss, "process_s": time.perf_counter() - T_START,
        "precision": {"bf16": bf16, "base_dtype": "float32", "reason": chosen.reason}}))


if __name__ == "__main__":
    main(sys.argv[1])
