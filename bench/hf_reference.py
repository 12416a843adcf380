"""The reference for ``make results``: a soft-prompt method trained by Hugging Face peft +
transformers ``Trainer`` in the setting of our row, to tell the method's accuracy from a bug of ours.

Run by ``bench/results.py --reference METHOD`` in its own process (its wall time and peak memory are
its own):

    python bench/hf_reference.py CONFIG.json

CONFIG holds: method (prompt_tuning | p_tuning), model_dir, train (JSONL), format, max_seq_len,
steps, micro_batch_size, lr, warmup_steps, seed, num_virtual_tokens, init_text (prompt tuning),
out_dir. The rows are tokenised by peftcli's data module, so both tools train on identical token
ids and labels; everything after that is HF peft's: ``get_peft_model`` with ``PromptTuningConfig``
(text init) or ``PromptEncoderConfig`` (MLP encoder), ``DataCollatorForSeq2Seq`` padding, the
model's own loss, ``Trainer`` with bf16 autocast on the CPU (the faster setting here). Writes
``out_dir/adapter/`` (scored by ``peft eval`` like our adapters) and ``out_dir/reference.json``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def main(config_path: str) -> None:
    import torch
    from datasets import Dataset
    from peft import PromptEncoderConfig, PromptEncoderReparameterizationType, PromptTuningConfig, PromptTuningInit, get_peft_model
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from peftcli import data, models
    from peftcli.recipe import DataSource

    cfg = json.loads(Path(config_path).read_text())
    out = Path(cfg["out_dir"])
    tok = models.load_tokenizer(cfg["model_dir"])
    rows = data.load_rows(DataSource(path=cfg["train"], format=cfg["format"]))
    examples, _ = data.tokenize_rows(rows, cfg["format"], tok, cfg["max_seq_len"], False, cfg["train"])
    train_set = Dataset.from_list([{"input_ids": e["input_ids"], "attention_mask": [1] * len(e["input_ids"]),
                                    "labels": e["labels"]} for e in examples])
    model = AutoModelForCausalLM.from_pretrained(cfg["model_dir"], dtype=torch.float32)
    if cfg["method"] == "prompt_tuning":
        peft_config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=cfg["num_virtual_tokens"],
                                         prompt_tuning_init=PromptTuningInit.TEXT, prompt_tuning_init_text=cfg["init_text"],
                                         tokenizer_name_or_path=cfg["model_dir"])
    else:
        peft_config = PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=cfg["num_virtual_tokens"],
                                          encoder_reparameterization_type=PromptEncoderReparameterizationType.MLP)
    model = get_peft_model(model, peft_config)
    args = TrainingArguments(
        output_dir=str(out / "trainer"), per_device_train_batch_size=cfg["micro_batch_size"], gradient_accumulation_steps=1,
        max_steps=cfg["steps"], learning_rate=cfg["lr"], lr_scheduler_type="cosine", warmup_steps=cfg["warmup_steps"],
        weight_decay=0.0, max_grad_norm=1.0, bf16=True, use_cpu=True, seed=cfg["seed"], logging_steps=10,
        save_strategy="no", report_to=[], dataloader_num_workers=0, remove_unused_columns=False, disable_tqdm=True)
    collator = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
    t0 = time.perf_counter()
    result = Trainer(model=model, args=args, train_dataset=train_set, data_collator=collator).train()
    train_s = time.perf_counter() - t0
    model.save_pretrained(out / "adapter")
    (out / "reference.json").write_text(json.dumps({
        "train_s": train_s, "steps": result.global_step, "train_loss": result.training_loss,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}))


if __name__ == "__main__":
    main(sys.argv[1])
