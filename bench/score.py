"""The one evaluator of the benchmark: held-out loss per supervised token, through HF peft.

Both tools' adapters are scored the same way — base loaded by transformers (float32, or NF4 for
the QLoRA workload), adapter attached with ``PeftModel.from_pretrained``, full-logits
cross-entropy summed over the supervised next-token targets — so neither tool's own loss code is
involved:

    python bench/score.py MODEL_DIR QUANTIZATION HELDOUT.jsonl MAX_SEQ_LEN [ADAPTER_DIR] [--device cuda]

Prints one JSON object: {"loss": nats per supervised token, "tokens": count}. Without an
adapter dir, scores the base model. ``--device`` (default cpu): where the forward runs.
"""

from __future__ import annotations

import json
import sys


def main(model_dir: str, quantization: str, heldout: str, max_seq_len: int, adapter_dir: str | None,
         device: str = "cpu") -> None:
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from peftcli import data, models
    from peftcli.recipe import DataSource

    tok = models.load_tokenizer(model_dir)
    rows = data.load_rows(DataSource(path=heldout, format="completion"))
    examples, _ = data.tokenize_rows(rows, "completion", tok, max_seq_len, False, heldout)
    kwargs = {"dtype": torch.float32}
    if quantization == "nf4":
        kwargs.update(device_map={"": device}, quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32))
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    if quantization != "nf4":
        model.to(device)
    if adapter_dir:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), 8):
            batch = {k: v.to(device) for k, v in data.collate(examples[i:i + 8], tok.pad_token_id).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            targets = batch["labels"][:, 1:]
            total += float(F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, reduction="sum",
                                           ignore_index=data.IGNORE_INDEX))
            n += int((targets != data.IGNORE_INDEX).sum())
    print(json.dumps({"loss": total / n, "tokens": n}))


if __name__ == "__main__":
    argv = sys.argv[1:]
    where = "cpu"
    if "--device" in argv:
        i = argv.index("--device")
        where = argv[i + 1]
        del argv[i:i + 2]
    main(argv[0], argv[1], argv[2], int(argv[3]), argv[4] if len(argv) > 4 else None, where)
