"""Build the tiny random Gemma 3 OpenVINO model shipped at worker/models/tiny-gemma3.

The model has the real Gemma 3 architecture (SigLIP vision tower, multimodal
projector, Gemma 3 decoder with sliding and full attention layers) at toy sizes
with random weights from a fixed seed. Its captions are random words, but it
runs through the same OpenVINO GenAI code paths as a real Gemma 3 export, so the
worker and its tests need no download and no torch.

Run offline in the model environment (torch, transformers, optimum-intel):

    .venv-model/bin/python scripts/build_tiny_model.py [--output DIR]

Steps:
1. Build a byte-level BPE tokenizer from a built-in word list.
2. Build the model and its processor, and save both in Hugging Face format.
3. Export that to OpenVINO IR with f32 weights, the OpenVINO tokenizer and
   the detokenizer.
4. Write the preprocessor config that the export leaves out.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# No model hub is reachable here, and nothing may try.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = REPO_ROOT / "worker" / "models" / "tiny-gemma3"

SEED = 20250301

# The first four ids follow Gemma 3's order. The other tokens only need to exist.
SPECIAL_TOKENS = [
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
]
VOCAB_SIZE = 512

IMAGE_SIZE = 64
PATCH_SIZE = 8
MM_TOKENS_PER_IMAGE = 4

# Same message layout as Gemma 3: the system prompt opens the first user turn, the
# assistant role is called "model", and an image item becomes <start_of_image>.
CHAT_TEMPLATE = """{{- bos_token -}}
{%- if messages and messages[0]['role'] == 'system' -%}
{%- if messages[0]['content'] is string -%}
{%- set system_text = messages[0]['content'] -%}
{%- else -%}
{%- set system_text = messages[0]['content'][0]['text'] -%}
{%- endif -%}
{%- set first_user_prefix = system_text + '\\n\\n' -%}
{%- set turns = messages[1:] -%}
{%- else -%}
{%- set first_user_prefix = '' -%}
{%- set turns = messages -%}
{%- endif -%}
{%- for message in turns -%}
{%- if message['role'] == 'assistant' -%}
{%- set role = 'model' -%}
{%- else -%}
{%- set role = message['role'] -%}
{%- endif -%}
{{- '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') -}}
{%- if message['content'] is string -%}
{{- message['content'] | trim -}}
{%- else -%}
{%- for item in message['content'] -%}
{%- if item['type'] == 'image' -%}
{{- '<start_of_image>' -}}
{%- elif item['type'] == 'text' -%}
{{- item['text'] | trim -}}
{%- endif -%}
{%- endfor -%}
{%- endif -%}
{{- '<end_of_turn>\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<start_of_turn>model\\n' -}}
{%- endif -%}
"""

# Training text for the tokenizer: caption-like words, so that the random model's
# output looks like words rather than byte soup.
WORDS = """
a an the this that of in on at with and or but by from to under over near behind
image photo picture scene view close up shot detail details describe shows showing
person people man woman child children boy girl dog cat bird horse cow sheep car bus
truck bicycle train boat plane street road city building house tree trees grass field
sky cloud clouds sun water river lake sea beach mountain hill snow rain light shadow
red green blue yellow white black brown gray orange purple pink dark bright colorful
small large big tall short long wide old young new round square wooden metal glass
sitting standing walking running flying holding looking wearing eating playing parked
table chair window door wall floor room kitchen bed sofa book cup plate food fruit
apple banana flower flowers garden park sign text letters background foreground left
right top bottom center middle front side corner edge pattern gradient texture stripes
you are a helpful assistant please answer question model user system
"""


def disable_openvino_telemetry() -> None:
    """Record a declined consent in the openvino-telemetry consent file.

    openvino-telemetry (2025.2) sends usage events from optimum-intel and the
    converters unless its consent file contains "0". Its opt_in_out --opt_out
    script would send one last opt-out event, so the file is written directly
    with the package's own checker instead.
    """
    try:
        from openvino_telemetry.utils.opt_in_checker import ConsentCheckResult, OptInChecker
    except ImportError:
        return
    if not OptInChecker().update_result(ConsentCheckResult.DECLINED):
        sys.exit("failed to write the openvino-telemetry consent file under ~/intel; make it writable and retry")


def build_tokenizer():
    """Train a byte-level BPE tokenizer on WORDS and wrap it as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = [" ".join(WORDS.split())] * 4 + [word for word in WORDS.split()]
    core.train_from_iterator(lines, trainer=trainer)
    bos_id = core.token_to_id("<bos>")
    core.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", bos_id)])

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        pad_token="<pad>",
        boi_token="<start_of_image>",
        eoi_token="<end_of_image>",
        image_token="<image_soft_token>",
        extra_special_tokens=["<start_of_turn>", "<end_of_turn>"],
        chat_template=CHAT_TEMPLATE,
        padding_side="left",
        model_max_length=2048,
    )
    for token in SPECIAL_TOKENS:
        if tokenizer.convert_tokens_to_ids(token) != SPECIAL_TOKENS.index(token):
            raise RuntimeError(f"special token {token} did not get id {SPECIAL_TOKENS.index(token)}")
    return tokenizer


def build_model(tokenizer):
    """Create Gemma3ForConditionalGeneration at toy sizes with seeded random weights."""
    import torch
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    text_config = {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 32,
        "query_pre_attn_scalar": 32,
        # One sliding and one full attention layer, as in every Gemma 3 block.
        "layer_types": ["sliding_attention", "full_attention"],
        "sliding_window": 512,
        "max_position_embeddings": 2048,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "bos_token_id": 2,
    }
    vision_config = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "image_size": IMAGE_SIZE,
        "patch_size": PATCH_SIZE,
        "vision_use_head": False,
    }
    config = Gemma3Config(
        text_config=text_config,
        vision_config=vision_config,
        mm_tokens_per_image=MM_TOKENS_PER_IMAGE,
        boi_token_index=tokenizer.convert_tokens_to_ids("<start_of_image>"),
        eoi_token_index=tokenizer.convert_tokens_to_ids("<end_of_image>"),
        image_token_index=tokenizer.convert_tokens_to_ids("<image_soft_token>"),
    )

    torch.manual_seed(SEED)
    model = Gemma3ForConditionalGeneration(config).eval()
    generator = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        # Gemma 3 starts the projection at zeros, which would make a random model
        # blind to the image. Unit-scale values make image tokens as loud as text.
        projection = model.model.multi_modal_projector.mm_input_projection_weight
        std = vision_config["hidden_size"] ** -0.5
        projection.copy_(torch.randn(projection.shape, generator=generator) * std)

        # The output layer shares the embedding matrix. Shrinking the rows of
        # tokens that are not whole words makes greedy output read as words.
        embeddings = model.get_input_embeddings().weight
        for token_id in range(len(tokenizer)):
            if not is_word_token(tokenizer, token_id):
                embeddings[token_id] *= 0.05
    return model


def is_word_token(tokenizer, token_id: int) -> bool:
    """Return whether the token decodes to a space and a word of two or more letters, or ends a turn."""
    if token_id in (tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<end_of_turn>")):
        return True
    text = tokenizer.decode([token_id])
    word = text[1:]
    return text.startswith(" ") and len(word) >= 2 and word.isascii() and word.isalpha()


def build_processor(tokenizer):
    from transformers import Gemma3ImageProcessor, Gemma3Processor

    image_processor = Gemma3ImageProcessor(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_pan_and_scan=False,
    )
    return Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
        image_seq_length=MM_TOKENS_PER_IMAGE,
    )


def export_openvino(source: Path, output: Path) -> None:
    """Export the saved model with optimum-cli: f32 weights, tokenizer and detokenizer included."""
    optimum_cli = Path(sys.executable).parent / "optimum-cli"
    command = [
        str(optimum_cli),
        "export",
        "openvino",
        "--model",
        str(source),
        "--task",
        "image-text-to-text",
        "--weight-format",
        "fp32",
        str(output),
    ]
    subprocess.run(command, check=True)


def write_preprocessor_config(processor, output: Path) -> None:
    # optimum-cli leaves this file out. OpenVINO GenAI reads the input size and
    # normalisation from it, and without it generation fails on a shape mismatch.
    image_processor = processor.image_processor
    config = {
        "image_processor_type": "Gemma3ImageProcessor",
        "processor_class": "Gemma3Processor",
        "do_resize": True,
        "size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        "resample": 2,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(image_processor.image_mean),
        "image_std": list(image_processor.image_std),
        "do_convert_rgb": True,
        "do_pan_and_scan": False,
        "image_seq_length": MM_TOKENS_PER_IMAGE,
    }
    (output / "preprocessor_config.json").write_text(json.dumps(config, indent=2) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="output directory, replaced if present")
    args = parser.parse_args()

    disable_openvino_telemetry()
    with tempfile.TemporaryDirectory(prefix="tiny-gemma3-") as tmp:
        work_dir = Path(tmp)
        hf_dir = work_dir / "hf"
        ov_dir = work_dir / "ov"

        tokenizer = build_tokenizer()
        model = build_model(tokenizer)
        processor = build_processor(tokenizer)
        model.save_pretrained(hf_dir)
        processor.save_pretrained(hf_dir)

        export_openvino(hf_dir, ov_dir)
        write_preprocessor_config(processor, ov_dir)

        if args.output.exists():
            shutil.rmtree(args.output)
        shutil.copytree(ov_dir, args.output)

    total = sum(path.stat().st_size for path in args.output.iterdir())
    print(f"wrote {args.output} ({total / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
