"""Write a tiny umt5 text encoder in the layout of ComfyUI's repackaged umt5-xxl file (the
tensor names of ComfyUI's own T5 class, plus the sentencepiece model under 'spiece_model'),
at a tiny size kept in the file's metadata ('config'). Output width stays 4096, as umt5-xxl's.

    cd ComfyUI && python make_tiny_umt5.py OUT.safetensors     (ComfyUI's Python)
"""
import io
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

CONFIG = {"d_ff": 32, "d_kv": 8, "d_model": 4096, "dense_act_fn": "gelu_pytorch_tanh", "is_gated_act": True,
          "layer_norm_epsilon": 1e-6, "model_type": "umt5", "num_heads": 2, "num_layers": 2,
          "relative_attention_num_buckets": 32, "vocab_size": 64, "pad_token_id": 0, "eos_token_id": 1}
TOKENIZER_TEXT = ("A person talking to the camera, natural head motion, clear lip movement, soft studio light. "
                  "A woman speaks calmly in a bright room; a man smiles and explains an idea to the viewer.")


def sentencepiece_model() -> bytes:
    import sentencepiece
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(TOKENIZER_TEXT.split(". ") * 20), model_writer=model,
                                             vocab_size=48, model_type="unigram", character_coverage=1.0,
                                             pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
    return model.getvalue()


def main(out: Path, seed: int = 5):
    sys.path.insert(0, str(Path.cwd()))  # ComfyUI's modules, this process only
    import comfy.options
    comfy.options.enable_args_parsing(False)
    from comfy.cli_args import args
    args.cpu = True
    import comfy.ops
    import comfy.text_encoders.t5
    model = comfy.text_encoders.t5.T5(CONFIG, torch.float32, "cpu", comfy.ops.manual_cast)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, value in model.state_dict().items():
        if "norm" in name:
            tensors[name] = torch.ones(value.shape)
        else:
            tensors[name] = torch.randn(value.shape, generator=generator) / max(value.shape[-1], 1) ** 0.5
    tensors["spiece_model"] = torch.frombuffer(bytearray(sentencepiece_model()), dtype=torch.uint8)
    save_file(tensors, str(out), metadata={"config": json.dumps(CONFIG)})


if __name__ == "__main__":
    main(Path(sys.argv[1]))
