import pytest

from sdray.models.presets import CLIP_MAX_LENGTH, CLIP_VOCAB_SIZE
from sdray.models.tokenizer import clip_tokenizer


def test_ids_match_openai_clip_vit_large_patch14():
    assert clip_tokenizer()("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_vocabulary_size_and_special_tokens():
    tok = clip_tokenizer()
    assert len(tok) == CLIP_VOCAB_SIZE
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (49406, 49407, 49407)


@pytest.mark.parametrize("text", ["", "a cat", "word " * 200])
def test_padding_and_truncation_to_77(text):
    ids = clip_tokenizer()(text, padding="max_length", truncation=True, max_length=CLIP_MAX_LENGTH).input_ids
    assert len(ids) == CLIP_MAX_LENGTH
    assert ids[0] == 49406
    assert ids[-1] == 49407  # truncation keeps the end-of-text token


def test_lowercases_and_splits_punctuation():
    assert clip_tokenizer()("Hello, World!").input_ids == [49406, 3306, 267, 1002, 256, 49407]


def test_a_model_directory_s_tokenizer_loads_without_the_model_libraries(tiny_model_dir):
    """Serve's ingress and preprocessing's decode tasks only tokenize: no diffusers, no torch (seconds each)."""
    import subprocess
    import sys

    code = (
        "import sys; from sdray.models.config import ModelConfig; from sdray.models.tokenizer import load_tokenizer;"
        f" tok = load_tokenizer(ModelConfig(path={str(tiny_model_dir)!r}));"
        " print(tok('a photo of a cat').input_ids, sorted(m for m in ('diffusers', 'torch') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[49406, 320, 1125, 539, 320, 2368, 49407] []"
