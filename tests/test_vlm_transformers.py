"""TransformersVLM on a tiny random-weight Qwen2.5-VL, saved to disk and loaded back the real way.

Nothing is downloaded: the tokenizer is a small byte-level BPE trained here, carrying Qwen's
special tokens and a Qwen-style chat template; the image processor and the model come from their
transformers config classes. The model talks nonsense, which is exactly what exercises the
retry-then-error path when it decodes freely, and shows the grammar's work when its decoding is held to
a stage's JSON Schema.
"""

import inspect
import json
import shutil

import jsonschema
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from csg.cli import main
from csg.errors import CSGError, InputError, WeightsError, WeightsMissingError
from csg.vlm import (
    MemoryNeed,
    TransformersVLM,
    Turn,
    VLMOutputError,
    check_fits,
    describe_scene,
    extract_graph,
    memory_needed,
    prompts,
)
from csg.vlm.transformers_backend import (
    GIB,
    WORKING_MEMORY_BASE,
    WORKING_MEMORY_SHARE,
    ImageOnlyProcessor,
    load_processor,
    qwen_messages,
)
from tests.test_cli import PORTRAIT, sdxl_folder  # noqa: F401 (sdxl_folder: a fixture shared with test_cli)

QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                       "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]

# Qwen's chat layout: <|im_start|>role\n ... <|im_end|>\n, an image as vision_start/image_pad/vision_end.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for part in m['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_qwen25_vl(folder):
    """Write a complete, tiny Qwen2.5-VL snapshot (config, safetensors, tokenizer, image processor)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=QWEN_SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(['{"concepts": [{"id": "c1", "name": "hair color"}], "description": "a photo"}'] * 4,
                            trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        chat_template=CHAT_TEMPLATE)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_SPECIAL_TOKENS}
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]},
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                           fullatt_block_indexes=[1], window_size=56),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(0)
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    # Small images: 56² to 112² pixels is 4 to 16 image tokens after the 2×2 merge.
    Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112).save_pretrained(folder)
    (folder / "processor_config.json").write_text('{"processor_class": "Qwen2_5_VLProcessor"}')
    return folder


@pytest.fixture(scope="module")
def qwen_folder(tmp_path_factory):
    torch.set_num_threads(1)  # the test machine is shared
    return build_tiny_qwen25_vl(tmp_path_factory.mktemp("tiny-qwen25-vl"))


@pytest.fixture(scope="module")
def vlm(qwen_folder):
    return TransformersVLM(qwen_folder, device="cpu")


PHOTO = Image.new("RGB", (96, 72), (30, 120, 200))


def test_snapshot_is_tiny_and_loads_lazily_through_from_pretrained(qwen_folder, vlm):
    size = sum(p.stat().st_size for p in qwen_folder.iterdir())
    assert size < 5 * 2**20
    assert not vlm.loaded
    vlm.load()
    assert vlm.loaded and type(vlm._model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert vlm._model.dtype == torch.float32 and vlm._model.device.type == "cpu"
    assert vlm.identity == f"transformers:{qwen_folder.resolve()}"


def test_greedy_generation_is_deterministic_and_decodes_only_new_tokens(vlm):
    turns = [Turn("user", "describe the photo"), Turn("assistant", "a photo"), Turn("user", "again")]
    first = vlm.generate("answer in JSON", turns, [PHOTO], temperature=0.0, max_tokens=12)
    second = vlm.generate("answer in JSON", turns, [PHOTO.convert("L")], temperature=0.0, max_tokens=12)
    third = vlm.generate("answer in JSON", turns, [PHOTO], temperature=0.0, max_tokens=12)
    assert isinstance(first, str) and first == third
    assert "<|im_start|>" not in first and "answer in JSON" not in first  # no prompt echo
    assert isinstance(second, str)


def test_nonsense_ends_in_the_retry_then_error_path(qwen_folder):
    vlm = TransformersVLM(qwen_folder, device="cpu", structured="off")  # free decoding: the random model rambles
    with pytest.raises(VLMOutputError) as caught:
        describe_scene(vlm, PHOTO, max_attempts=2)
    error = caught.value
    assert error.stage == "scene description"
    assert "2 attempt(s)" in str(error) and "Last problem:" in str(error)
    assert isinstance(error.output, str)
    assert repr(error.output[:40])[1:-1] in str(error)  # the last answer is quoted
    with pytest.raises(VLMOutputError, match="concept extraction"):
        extract_graph(vlm, PHOTO, caption="a blue square", max_attempts=1)


def test_token_callback_reports_progress_and_can_cancel(qwen_folder):
    seen = []
    vlm = TransformersVLM(qwen_folder, device="cpu", on_token=lambda done, budget: seen.append((done, budget)))
    vlm.generate("s", [Turn("user", "u")], [PHOTO], temperature=0.0, max_tokens=6)
    assert seen and all(budget == 6 for _, budget in seen)
    assert [done for done, _ in seen] == list(range(1, len(seen) + 1))

    class Cancelled(Exception):
        pass

    def cancel(done, budget):
        if done == 2:
            raise Cancelled

    vlm.on_token = cancel
    with pytest.raises(Cancelled):
        vlm.generate("s", [Turn("user", "u")], [PHOTO], temperature=0.0, max_tokens=50)


def test_unload_frees_and_the_next_call_reloads(qwen_folder):
    vlm = TransformersVLM(qwen_folder, device="cpu", dtype="float32")
    before = vlm.generate("s", [Turn("user", "u")], [PHOTO], temperature=0.0, max_tokens=4)
    vlm.unload()
    assert not vlm.loaded and vlm._processor is None
    assert vlm.generate("s", [Turn("user", "u")], [PHOTO], temperature=0.0, max_tokens=4) == before


def test_missing_or_incomplete_folders_say_what_to_put_there(tmp_path, qwen_folder):
    with pytest.raises(WeightsMissingError, match="no VLM model folder.*hf download"):
        TransformersVLM(tmp_path / "nowhere", device="cpu").load()
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_text((qwen_folder / "config.json").read_text())
    (partial / "model.safetensors.index.json").write_text('{"weight_map": {"a": "model-00001-of-00002.safetensors"}}')
    with pytest.raises(WeightsMissingError) as caught:
        TransformersVLM(partial, device="cpu").generate("s", [Turn("user", "u")], [], temperature=0, max_tokens=1)
    message = str(caught.value)
    assert str(partial) in message and "model-00001-of-00002.safetensors" in message
    assert "tokenizer.json" in message and "preprocessor_config.json" in message


@pytest.mark.parametrize("kwargs", [{"device": "warp-drive"}, {"dtype": "int8"}, {"dtype": "float99"}])
def test_bad_device_or_dtype(kwargs, qwen_folder):
    with pytest.raises(InputError):
        TransformersVLM(qwen_folder, **kwargs)


def test_the_fallback_processor_feeds_the_model_what_autoprocessor_feeds_it(qwen_folder, vlm):
    """Where torchvision is installed (e.g. a ComfyUI environment) AutoProcessor is used; elsewhere the
    image-only fallback. Both must give the model the same tensors for the same chat."""
    pytest.importorskip("torchvision", reason="AutoProcessor builds Qwen-VL's video processor with torchvision")
    vlm.load()
    auto = load_processor(qwen_folder, vlm._model)
    assert not isinstance(auto, ImageOnlyProcessor)
    config = vlm._model.config
    fallback = ImageOnlyProcessor.from_folder(qwen_folder, config.image_token_id,
                                              "mm_token_type_ids" in inspect.signature(vlm._model.forward).parameters)
    messages = qwen_messages("answer in JSON", [Turn("user", "describe the photo")], image_count=1)
    ours = fallback(text=[fallback.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)],
                    images=[PHOTO], return_tensors="pt")
    theirs = auto(text=[auto.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)],
                  images=[PHOTO], return_tensors="pt")
    assert set(ours) == set(theirs)
    for name in theirs:
        assert torch.equal(ours[name], theirs[name]), name


# -- placement and memory ----------------------------------------------------------------------------------


class RecordingPlacement:
    """A host's placement: it records what it was asked to place and when it was told the model is dropped."""

    def __init__(self):
        self.events = []

    def place(self, model):
        self.events.append(("place", model))

    def release(self):
        self.events.append(("release", None))


def test_a_placement_places_the_model_before_every_answer_and_hears_of_its_unloading(qwen_folder):
    placement = RecordingPlacement()
    vlm = TransformersVLM(qwen_folder, device="cpu", placement=placement)
    for _ in range(2):
        vlm.generate("s", [Turn("user", "u")], [PHOTO], temperature=0.0, max_tokens=2)
    model = vlm._model
    assert placement.events == [("place", model), ("place", model)]
    vlm.unload()
    vlm.generate("s", [Turn("user", "u")], [PHOTO], temperature=0.0, max_tokens=2)
    assert [event for event, _ in placement.events] == ["place", "place", "release", "place"]
    assert placement.events[-1][1] is vlm._model is not model  # a fresh copy, placed again


def test_the_memory_need_is_the_checkpoints_parameter_count_in_the_dtype_plus_working_memory(qwen_folder, vlm,
                                                                                            tmp_path):
    vlm.load()
    parameters = sum(p.numel() for p in vlm._model.parameters())
    need = memory_needed(qwen_folder, torch.float32)
    assert need.parameters == parameters and need.weights == 4 * parameters
    assert need.working == WORKING_MEMORY_BASE + int(WORKING_MEMORY_SHARE * need.weights)
    assert need.total == need.weights + need.working
    half = memory_needed(qwen_folder, torch.bfloat16)
    assert half.weights == 2 * parameters and half.total < need.total
    assert f"{parameters / 1e9:.2f} B parameters x 2 bytes" in str(half) and "bfloat16" in str(half)

    sharded = tmp_path / "sharded"  # an index and several shards, as the big snapshots come
    vlm._model.save_pretrained(sharded, max_shard_size="100KB")
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
        (sharded / name).write_bytes((qwen_folder / name).read_bytes())
    assert len(list(sharded.glob("*.safetensors"))) > 1 and (sharded / "model.safetensors.index.json").is_file()
    assert memory_needed(sharded, torch.float32) == need

    pickled = tmp_path / "pickled"  # old *.bin weights: their shapes cannot be read without loading them
    pickled.mkdir()
    for path in qwen_folder.iterdir():
        if path.suffix != ".safetensors":
            (pickled / path.name).write_bytes(path.read_bytes())
    torch.save(vlm._model.state_dict(), pickled / "pytorch_model.bin")
    assert memory_needed(pickled, torch.float32) is None

    with pytest.raises(WeightsMissingError, match="no VLM model folder"):
        memory_needed(tmp_path / "nowhere", torch.float32)


QWEN3_VL_8B = MemoryNeed(8_767_123_696, torch.bfloat16, WORKING_MEMORY_BASE + int(0.1 * 8_767_123_696 * 2))
QWEN3_VL_30B = MemoryNeed(31_070_754_032, torch.bfloat16, WORKING_MEMORY_BASE + int(0.1 * 31_070_754_032 * 2))


def test_a_model_that_fits_passes_and_one_that_cannot_names_what_would_fit():
    check_fits(QWEN3_VL_8B, 24 * GIB, "cuda:0", "Qwen3-VL-8B-Instruct")  # 19 GiB on a 24 GiB card
    with pytest.raises(InputError) as refused:
        check_fits(QWEN3_VL_8B, 16 * GIB, "cuda:0", "Qwen3-VL-8B-Instruct")
    message = str(refused.value)
    assert "Qwen3-VL-8B-Instruct cannot fit on cuda:0" in message
    assert "about 19.0 GiB in bfloat16: 8.77 B parameters x 2 bytes = 16.3 GiB of weights" in message
    assert "cuda:0 has 16.0 GiB in all" in message
    assert "Qwen2.5-VL-3B-Instruct" in message and "Qwen3-VL-4B-Instruct" in message
    assert "device cpu" in message and "bfloat16, which halves" not in message  # already half precision

    in_float32 = MemoryNeed(QWEN3_VL_30B.parameters, torch.float32, QWEN3_VL_30B.working)
    with pytest.raises(InputError) as refused:
        check_fits(in_float32, 24 * GIB, "cpu", "Qwen3-VL-30B-A3B-Instruct")
    message = str(refused.value)
    assert "dtype bfloat16, which halves the weights" in message and "device cpu" not in message  # it is on the cpu


# -- answers held to the stage's JSON Schema (llguidance) ---------------------------------------------------

SCHEMA_STAGES = [prompts.EXTRACT, prompts.PROPOSE, prompts.PROPAGATE, prompts.JUDGE]
SEEDS = range(20)


def noise_photo(seed: int) -> Image.Image:
    """A different picture per seed, so each seed is a different question to the random model."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8))


def fits(answer: str, schema) -> bool:
    try:
        jsonschema.validate(json.loads(answer), schema)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def ask_stage(vlm, stage, seed: int, max_tokens: int | None = None) -> tuple[str, int]:
    """The answer of one stage's question at its own temperature, and how many tokens it took."""
    torch.manual_seed(seed)
    answer = vlm.generate(stage.system, [Turn("user", "Answer about this picture.")], [noise_photo(seed)],
                          temperature=stage.temperature, max_tokens=max_tokens or stage.max_tokens,
                          schema=stage.schema)
    return answer, len(vlm._processor.tokenizer(answer)["input_ids"])


@pytest.mark.slow
@pytest.mark.parametrize("stage", SCHEMA_STAGES, ids=lambda stage: stage.name)
def test_the_grammar_makes_the_random_model_fit_the_schema_and_free_decoding_does_not(qwen_folder, stage):
    """Constrained, the random model's answers fit the stage's schema for all 20 seeds, within the stage's token
    budget (its strings would run to their maximum length, but decoding hurries to close once the tokens left
    come down to the schema's closing reserve); asked freely, with the tokens the constrained answer took, it
    rarely writes even JSON: the grammar does the work."""
    held = TransformersVLM(qwen_folder, device="cpu")
    free = TransformersVLM(qwen_folder, device="cpu", structured="off")
    constrained_fits, free_fits = 0, 0
    for seed in SEEDS:
        answer, tokens = ask_stage(held, stage, seed)
        assert fits(answer, stage.schema), f"seed {seed}: {tokens} tokens, no fit: {answer[-300:]!r}"
        constrained_fits += 1
        free_fits += fits(ask_stage(free, stage, seed, max_tokens=tokens)[0], stage.schema)
    print(f"{stage.name}: constrained {constrained_fits}/{len(SEEDS)} fit; free {free_fits} fit")
    assert constrained_fits == len(SEEDS) == 20 and free_fits < len(SEEDS) / 2


def test_the_closing_reserve_fits_each_stages_budget_and_bounds_its_shortest_answer(qwen_folder):
    grammars = TransformersVLM(qwen_folder, device="cpu").grammars()
    for stage in SCHEMA_STAGES:
        reserve = grammars.reserve(stage.schema)
        assert 0 < reserve < stage.max_tokens / 2, stage.name  # hurrying leaves most of the budget to the answer
    assert grammars.reserve(prompts.PROPOSE.schema) > grammars.reserve(prompts.PROPAGATE.schema)  # 3 against 1


def test_json_mode_holds_to_any_object_and_the_grammar_is_compiled_once_per_schema(qwen_folder):
    vlm = TransformersVLM(qwen_folder, device="cpu", structured="json")
    answer, _ = ask_stage(vlm, prompts.JUDGE, 0, max_tokens=200)
    assert isinstance(json.loads(answer), dict)
    held = TransformersVLM(qwen_folder, device="cpu")
    for seed in range(2):
        ask_stage(held, prompts.JUDGE, seed)
    grammars = held.grammars()
    assert len(grammars._compiled) == 1  # the second answer reused the compiled grammar
    held.unload()
    assert held._grammars is None  # a reloaded tokenizer gets its grammars anew


def test_an_answer_cut_off_by_max_tokens_is_left_to_the_parser(qwen_folder):
    vlm = TransformersVLM(qwen_folder, device="cpu")
    answer, tokens = ask_stage(vlm, prompts.EXTRACT, 0, max_tokens=8)
    assert tokens <= 8 and answer.startswith('{"concepts": [') and not fits(answer, prompts.EXTRACT.schema)
    with pytest.raises(VLMOutputError, match="concept extraction"):
        extract_graph(vlm, PHOTO, caption="a blue square", max_attempts=1)


def test_an_unknown_mode_is_refused(qwen_folder):
    with pytest.raises(InputError, match="structured-output mode 'grammar'.*auto, schema, json, off"):
        TransformersVLM(qwen_folder, structured="grammar")


# -- broken or foreign model folders: a typed error naming the file and the fix, before anything loads -------


def _cut_weights(folder):
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])


def _other_shapes(folder):
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["hidden_size"] = 64
    (folder / "config.json").write_text(json.dumps(config))


def _llama(folder):
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 32, "vocab_size": 320}))


BROKEN_FOLDERS = {
    "truncated weights": (_cut_weights, "model.safetensors is not a readable safetensors file"),
    "random weights": (lambda f: (f / "model.safetensors").write_bytes(bytes(range(256)) * 64),
                       "model.safetensors is not a readable safetensors file"),
    "shapes unlike the config": (_other_shapes, "shapes are not the ones config.json describes"),
    "null config": (lambda f: (f / "config.json").write_text("null"), "config.json holds a JSON NoneType"),
    "cut-off tokenizer": (lambda f: (f / "tokenizer.json").write_text('{"model": '),
                          "tokenizer.json is not valid JSON"),
    "tokenizer of another layout": (lambda f: (f / "tokenizer.json").write_text('{"model": 5}'), "do not fit together"),
    "cut-off image processor": (lambda f: (f / "preprocessor_config.json").write_text("[1,"),
                                "preprocessor_config.json is not valid JSON"),
    "a list as tokenizer config": (lambda f: (f / "tokenizer_config.json").write_text("[]"),
                                   "tokenizer_config.json holds a JSON list"),
    "a text-only LLaMA": (_llama, "holds a 'llama' model.*runs a Qwen3-VL or Qwen2.5-VL.*qwen3_vl, qwen3_vl_moe, "
                                  "qwen2_5_vl"),
}


def broken_copy(qwen_folder, tmp_path, corrupt):
    folder = tmp_path / "broken"
    shutil.copytree(qwen_folder, folder)
    corrupt(folder)
    return folder


@pytest.mark.parametrize("case", BROKEN_FOLDERS)
def test_a_broken_or_foreign_folder_gets_a_typed_error_naming_the_file_and_the_fix(case, qwen_folder, tmp_path):
    corrupt, message = BROKEN_FOLDERS[case]
    folder = broken_copy(qwen_folder, tmp_path, corrupt)
    with pytest.raises(WeightsError, match=message) as caught:
        TransformersVLM(folder, device="cpu").generate("s", [Turn("user", "u")], [PHOTO], temperature=0, max_tokens=1)
    text = str(caught.value)
    assert str(folder) in text and ("download" in text.lower() or "Fix the JSON" in text or "Point it" in text)
    assert "Config, " not in text  # not transformers' list of every config class it knows


CLI_FAST = ["--steps", "6", "--warmup", "2", "--max-side", "64", "--device", "cpu", "--dtype", "float32"]




@pytest.mark.parametrize("case", ["null config", "a text-only LLaMA", "shapes unlike the config"])
def test_the_cli_exits_2_for_a_broken_vlm_folder_without_a_traceback(case, qwen_folder, sdxl_folder, tmp_path,
                                                                      capsys):
    folder = broken_copy(qwen_folder, tmp_path, BROKEN_FOLDERS[case][0])
    code = main([str(PORTRAIT), "--do", "age=old", "--vlm-model", str(folder), "--sdxl", str(sdxl_folder),
                 "--out", str(tmp_path / "out"), *CLI_FAST])
    err = capsys.readouterr().err
    assert code == 2 and str(folder) in err and "Traceback" not in err


MODEL_JSON_FILES = ["config.json", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(MODEL_JSON_FILES), content=st.one_of(
    st.binary(max_size=200),
    st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                 lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                 max_leaves=8).map(lambda data: json.dumps(data).encode())))
def test_whatever_bytes_a_config_or_tokenizer_holds_only_the_packs_typed_errors_come_out(name, content, qwen_folder,
                                                                                          tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzzed")
    shutil.copytree(qwen_folder, folder, dirs_exist_ok=True)
    (folder / name).write_bytes(content)
    try:
        TransformersVLM(folder, device="cpu").load()
    except CSGError:
        pass
    finally:
        shutil.rmtree(folder)
