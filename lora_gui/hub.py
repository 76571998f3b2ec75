"""Sharing a run: its model card, and uploading it to the Hugging Face Hub.

The card is the run folder's README.md, with the front matter the Hub reads (base_model, tags,
instance_prompt, and a widget of the preview images, which the `template:sd-lora` gallery shows).
An upload sends the two LoRA files, the card and the previews; never the training images or the
checkpoints. The token only ever lives in memory: it is handed to huggingface_hub for the upload,
and is never written to a file or a log line.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from lora_gui.atomic import write_text_atomic
from lora_gui.config import TrainConfig
from lora_gui.errors import LoraGuiError
from lora_gui.families import Family, get_family
from lora_gui.lora_files.export import write_kohya_lora
from lora_gui.runs import DIFFUSERS_LORA, RunFolder, TrainingRecord

log = logging.getLogger(__name__)

TAGS = ("text-to-image", "stable-diffusion", "lora", "diffusers", "template:sd-lora")
_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")


def final_samples(run: RunFolder, record: TrainingRecord) -> list[tuple[str, Path]]:
    """(prompt, image) of the latest preview images, in prompt order."""
    samples = run.sample_images()
    if not samples:
        return []
    last, prompts = samples[-1][0], record.preview_prompts
    return [(prompts[index], path) for step, index, path in samples if step == last and index < len(prompts)]


def model_card(run: RunFolder, repo_id: str | None = None) -> str:
    """The run's README.md: Hub front matter, then how to use the LoRA and how it was trained."""
    config = TrainConfig.load(run.config)
    record = TrainingRecord.load(run)
    family = get_family(record.family)
    trigger = config.trigger_word.strip()
    samples = final_samples(run, record)
    source = repo_id or run.path.as_posix()
    base = record.base_model_hub_id or record.base_model_name
    prompt = samples[0][0] if samples else (trigger or "a photo")
    lines = [
        f"# {run.name}",
        "",
        "<Gallery />",
        "",
        f"{'An edit LoRA, learned from before/after pairs,' if run.control.is_dir() else 'A LoRA'} for "
        f"{family.title} ({base}), trained with lora_gui for {record.steps} steps "
        f"at {config.resolution} px (rank {config.rank}, alpha {config.lora_alpha:g}).",
        "",
    ]
    if trigger:
        lines += ["## Trigger word", "", f"Put `{trigger}` in the prompt to call up what this LoRA learned.", ""]
    lines += [
        "## Files",
        "",
        f"- `{DIFFUSERS_LORA}`: for diffusers (`pipeline.load_lora_weights`).",
        f"- `{run.kohya_lora.name}`: kohya layout, with training metadata, for AUTOMATIC1111 and Forge "
        "(`models/Lora`) and ComfyUI (`models/loras`, LoraLoader node).",
        "",
        "## Use it with diffusers",
        "",
        "```python",
        "import torch",
        "from diffusers import AutoPipelineForText2Image",
        *(["from diffusers.utils import load_image"] if run.control.is_dir() else []),
        "",
        *_loading_code(family, base),
        f'pipe.load_lora_weights("{source}", weight_name="{DIFFUSERS_LORA}")',
        *_calling_code(run, prompt),
        "```",
        "",
        "## Training",
        "",
        "| setting | value |",
        "| --- | --- |",
        f"| base model | {base} |",
        f"| steps | {record.steps} |",
        f"| resolution | {config.resolution} |",
        f"| rank / alpha | {config.rank} / {config.lora_alpha:g} |",
        f"| learning rate | {config.learning_rate:g} |",
        f"| batch size | {config.batch_size} |",
        f"| text encoder trained | {'yes' if config.train_text_encoder else 'no'} |",
        "",
    ]
    return _front_matter(run, record, trigger, samples) + "\n\n" + "\n".join(lines)


def _calling_code(run: RunFolder, prompt: str) -> list[str]:
    """The card's line that makes a picture: an edit LoRA's (trained on pairs) edits one, as its instruction says."""
    if not run.control.is_dir():
        return [f"image = pipe({json.dumps(prompt)}).images[0]"]
    return [
        "# An edit LoRA: give it the picture to edit, and the edit in words.",
        f'image = pipe(image=load_image("picture.png"), prompt={json.dumps(prompt)}).images[0]',
    ]


def _loading_code(family: type[Family], base: str) -> list[str]:
    """The card's lines that load the base as a user's GPU can run it: in the dtype its pipeline is meant for, and
    moved to the GPU whole only where it fits one."""
    load = f'AutoPipelineForText2Image.from_pretrained("{base}", torch_dtype=torch.{family.pipeline_dtype})'
    if family.too_large_for_one_gpu is None:
        return [f'pipe = {load}.to("cuda")']
    return [
        f"pipe = {load}",
        f"# {family.too_large_for_one_gpu}: offload moves each part to the GPU when it works.",
        "pipe.enable_model_cpu_offload()",
    ]


def _front_matter(run: RunFolder, record: TrainingRecord, trigger: str, samples: list[tuple[str, Path]]) -> str:
    """The YAML the Hub reads: base model, tags, trigger word, and the previews as the gallery's widget."""
    front = ["---"]
    if record.base_model_hub_id:
        front.append(f"base_model: {json.dumps(record.base_model_hub_id)}")
    front += ["library_name: diffusers", "tags:", *(f"- {json.dumps(tag)}" for tag in TAGS)]
    if trigger:
        front.append(f"instance_prompt: {json.dumps(trigger)}")
    if samples:
        front.append("widget:")
        for prompt, image in samples:
            url = image.relative_to(run.path).as_posix()
            front += [f"- text: {json.dumps(prompt)}", "  output:", f"    url: {json.dumps(url)}"]
    return "\n".join([*front, "---"])


def write_model_card(run: RunFolder, repo_id: str | None = None) -> Path:
    write_text_atomic(run.model_card, model_card(run, repo_id))
    return run.model_card


def push_to_hub(run_dir: str | Path, repo_id: str, token: str | None = None, private: bool = False) -> str:
    """Upload a run's LoRA files, model card and preview images to a Hub model repo; return its URL.

    Without a token, huggingface_hub's own login (`hf auth login`, HF_TOKEN) is used. Nothing in
    the run folder is removed, whatever happens; the card is rewritten to point at the repo.
    """
    from huggingface_hub import HfApi, constants, get_token
    from huggingface_hub.errors import HfHubHTTPError

    run = RunFolder(Path(run_dir))
    repo_id = repo_id.strip()
    if not _REPO_ID.match(repo_id):
        raise LoraGuiError(
            f"{repo_id!r} is not a Hub repo name: use NAME or OWNER/NAME (letters, digits, '-', '_', '.')"
        )
    if not run.diffusers_lora.is_file():
        raise LoraGuiError(f"{run.path} holds no {DIFFUSERS_LORA} to upload: has training saved a LoRA yet?")
    if constants.HF_HUB_OFFLINE:
        raise LoraGuiError(
            "can't upload: offline mode is on (the HF_HUB_OFFLINE environment variable). Unset it, connect "
            "to the internet and try again; the run folder is unchanged"
        )
    if not (token or get_token()):
        raise LoraGuiError(
            "no Hugging Face token: give one with write access (huggingface.co/settings/tokens), "
            "or log in once with `hf auth login`"
        )
    if not run.kohya_lora.is_file():
        write_kohya_lora(run)
    write_model_card(run, repo_id)
    api = HfApi(token=token)
    try:
        repo = api.create_repo(repo_id, private=private, exist_ok=True)
        log.info("Uploading %s to %s", run.name, repo.repo_id)
        api.upload_folder(
            repo_id=repo.repo_id,
            folder_path=run.path,
            allow_patterns=[DIFFUSERS_LORA, run.kohya_lora.name, run.model_card.name, "samples/*.png"],
            commit_message=f"Upload LoRA {run.name} (trained with lora_gui)",
        )
    except HfHubHTTPError as error:
        raise LoraGuiError(_refusal(error, repo_id, token)) from None
    except Exception as error:
        # Transport errors come from huggingface_hub's HTTP client, whose classes differ between versions.
        raise LoraGuiError(
            f"could not reach the Hugging Face Hub ({_scrub(str(error), token)}). Check the internet "
            "connection and try again; the run folder is unchanged"
        ) from None
    log.info("Uploaded %s to %s", run.name, repo.url)
    return str(repo.url)


def _refusal(error: Exception, repo_id: str, token: str | None) -> str:
    status = getattr(getattr(error, "response", None), "status_code", None)
    if status == 401:
        return "the Hub did not accept the token: check it, or make a write token at huggingface.co/settings/tokens"
    if status == 403:
        return f"this token may not create or write {repo_id}: use a token with write access, or a repo of your own"
    detail = _scrub(str(error).splitlines()[0], token)
    return f"the Hub refused the upload to {repo_id} ({detail}); the run folder is unchanged"


def _scrub(text: str, token: str | None) -> str:
    """The text with the token blanked out, in case a library echoed it."""
    return text.replace(token, "***") if token else text
