"""The shipped tiny Gemma 3 model runs in both OpenVINO GenAI pipelines without torch."""

from __future__ import annotations

import numpy as np
import openvino as ov
import openvino_genai
import pytest

PROMPT = "Describe this image in detail."


def _image_tensor(seed: int) -> ov.Tensor:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(1, 48, 80, 3), dtype=np.uint8)
    return ov.Tensor(pixels)


def _greedy_config() -> openvino_genai.GenerationConfig:
    config = openvino_genai.GenerationConfig()
    config.max_new_tokens = 12
    config.do_sample = False
    return config


@pytest.fixture(scope="module")
def vlm_pipeline(tiny_model_dir):
    return openvino_genai.VLMPipeline(str(tiny_model_dir), "CPU")


@pytest.fixture(scope="module")
def batching_pipeline(tiny_model_dir):
    scheduler = openvino_genai.SchedulerConfig()
    scheduler.cache_size = 1
    scheduler.max_num_seqs = 4
    return openvino_genai.ContinuousBatchingPipeline(str(tiny_model_dir), scheduler, "CPU")


def _caption_batched(pipeline, seeds: list[int]) -> list[str]:
    handles = [
        pipeline.add_request(request_id, PROMPT, [_image_tensor(seed)], _greedy_config())
        for request_id, seed in enumerate(seeds)
    ]
    while pipeline.has_non_finished_requests():
        pipeline.step()
    tokenizer = pipeline.get_tokenizer()
    return [tokenizer.decode(handle.read_all()[0].generated_ids) for handle in handles]


def test_vlm_pipeline_captions_image(vlm_pipeline):
    result = vlm_pipeline.generate(PROMPT, images=[_image_tensor(1)], generation_config=_greedy_config())

    assert result.texts[0].strip()


def test_vlm_pipeline_caption_depends_on_image(vlm_pipeline):
    first = vlm_pipeline.generate(PROMPT, images=[_image_tensor(1)], generation_config=_greedy_config())
    second = vlm_pipeline.generate(PROMPT, images=[_image_tensor(2)], generation_config=_greedy_config())

    assert first.texts[0] != second.texts[0]


def test_batching_pipeline_captions_images(batching_pipeline):
    captions = _caption_batched(batching_pipeline, [1, 2])

    assert captions[0].strip()
    assert captions[1].strip()


def test_batching_pipeline_caption_depends_on_image(batching_pipeline):
    captions = _caption_batched(batching_pipeline, [1, 2])

    assert captions[0] != captions[1]


def test_batching_pipeline_matches_vlm_pipeline(vlm_pipeline, batching_pipeline):
    sequential = vlm_pipeline.generate(PROMPT, images=[_image_tensor(3)], generation_config=_greedy_config())
    batched = _caption_batched(batching_pipeline, [3])

    assert batched[0] == sequential.texts[0]


def test_tokenizer_has_gemma3_chat_template(tiny_model_dir):
    tokenizer = openvino_genai.Tokenizer(str(tiny_model_dir))
    messages = [{"role": "system", "content": "S."}, {"role": "user", "content": "U."}]

    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True)

    assert rendered == "<bos><start_of_turn>user\nS.\n\nU.<end_of_turn>\n<start_of_turn>model\n"
