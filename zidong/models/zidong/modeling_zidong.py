"""`ZidongModel`: three Hugging Face towers, a shared embedding space, a fusion encoder and the OPT-style heads.

    model = ZidongModel(ZidongConfig.from_preset("tiny"))
    out = model(input_ids=..., text_attention_mask=..., pixel_values=..., input_values=..., speech_attention_mask=...,
                text_present=..., vision_present=..., speech_present=...,
                return_loss=True, loss_weights={"contrastive": 1.0, "matching": 0.5, "masked_text": 0.5})
    out.text_embeds, out.vision_embeds, out.speech_embeds   # (batch, projection_dim), L2-normalised
    out.loss, out.losses                                      # weighted total; every objective and pair apart

Missing modalities. A batch of B samples carries per-modality inputs only for the samples that have that
modality (`text_present`, a (B,) bool mask, says which rows `input_ids` belongs to; likewise for vision and
speech). Each tower runs on its present rows only; the embeddings are scattered back to (B, D) with zeros for
absent rows, a pair loss uses only the samples that have both modalities, and the fusion encoder masks out the
modalities a sample lacks, so a missing modality never contributes a gradient.

Objectives (`loss_weights`; a weight of 0 or a missing key skips that objective's compute), each one `Objective`
in the registry of objectives_zidong.py, its losses in its own module that reads the towers' output (`Encoded`,
towers_zidong.py) and returns named losses:
- `contrastive` (contrastive_zidong.py): symmetric loss for every present modality pair, negatives from all ranks.
- `matching` (matching_zidong.py): the fusion encoder tells "matched" from "text / vision / speech was swapped"
  on hard negatives mined from the contrastive scores.
- `masked_text` / `masked_vision` / `masked_speech` (masking_zidong.py): one extra pass of the towers on masked
  inputs; the fusion encoder predicts the masked tokens, pixels and filterbank steps.

How the model runs on several processes is set once, by the training side (`prepare_for_launcher`: lockstep for
DeepSpeed and FSDP, every call running the same modules in the same order whatever the batch holds, and the
contrastive loss's gather of every process's embeddings); lockstep_zidong.py is the one place that knows how.

Each tower runs as the kind of input it reads says (`TowerInput`, tower_inputs_zidong.py: token ids, pixel values,
waveforms or filterbanks), which yields `TowerOutput(token_states, attention_mask, pooled)`: text and speech pool
by masked mean (independent of padding), vision as `vision_pooling` says: the tower's own pooler where it keeps
one (CLIP, SigLIP, DINOv2, ConvNeXt), else the class token (ViT, the presets), else the mean of its tokens (Swin).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import ClassVar

import torch
import torch.nn.functional as F
import torchaudio
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.utils import can_return_tuple

from .arguments_zidong import (
    Presence,
    batch_presence,
    given_switches,
    modality_inputs,
    text_mask_argument,
)
from .configuration_zidong import MODALITIES, ZidongConfig
from .contrastive_zidong import EmbeddingGather
from .feature_extraction_zidong import BatchedFbank, normalize_and_stack
from .fusion_zidong import ZidongFusionEncoder, ZidongPredictionHead
from .lockstep_zidong import Launch, Lockstep
from .lora_zidong import add_lora
from .matching_zidong import MATCHING_CLASSES
from .objectives_zidong import OBJECTIVES, REGISTRY, checked_loss_weights
from .outputs_zidong import ZidongOutput, text_vision_logits, tower_model_output
from .tower_features_zidong import ZidongTowerFeatures
from .tower_inputs_zidong import tower_input
from .towers_zidong import (
    Encoded,
    KeptTowerWeights,
    TowerOutput,
    build_tower,
    masked_mean,
    pretrained_tower_config,
    pretrained_tower_weights,
    scatter_rows,
    tower_width,
    vision_patch_size,
    vision_pooling,
)


class ZidongPreTrainedModel(PreTrainedModel):
    config_class = ZidongConfig
    base_model_prefix = "zidong"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True  # towers are built with attn_implementation="sdpa"; the fusion encoder calls SDPA
    # device_map="auto" keeps each fusion layer whole (post_init adds the towers' own layers)
    _no_split_modules: ClassVar[list[str]] = ["ZidongFusionLayer"]
    # the towers' poolers, in checkpoints and exports written before towers were built without them
    _keys_to_ignore_on_load_unexpected: ClassVar[list[str]] = [r"_model\.pooler\."]
    launch: Launch = Launch()  # one process, no lockstep, until `prepare_for_launcher` says otherwise

    def prepare_for_launcher(self, lockstep: bool = False, gather: EmbeddingGather | None = None) -> None:
        """How every later forward runs (lockstep_zidong.py): `lockstep` for DeepSpeed and FSDP, where every
        process must call the same modules whatever its batch holds; `gather`, every process's embeddings for the
        contrastive loss (zidong's trainer hands one over on several processes). Set on every zidong model inside
        this one (a classifier's joint model too)."""
        for module in self.modules():
            if isinstance(module, ZidongPreTrainedModel):
                module.launch = Launch(lockstep, gather)

    @classmethod
    def is_custom_code(cls) -> bool:
        """False: transformers treats classes outside its package as custom code, and then skips every module
        without parameters of its own while initialising, in the towers too, so a tower's own rules for such
        modules never ran (Wav2Vec2-BERT's feature projection got normal(0, 0.02) instead of its uniform init).
        That guard exists for `_init_weights` that write parameters in place; ours uses
        `transformers.initialization`, which leaves loaded parameters alone, as the library's own models do."""
        return False

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)  # linear, embedding and norm layers outside the towers
        if isinstance(module, ZidongModel):
            init.constant_(module.logit_scale, self.config.logit_scale_init_value)
            init.constant_(module.logit_bias, self.config.logit_bias_init_value)
        elif isinstance(module, ZidongFusionEncoder):
            init.normal_(module.cls_token, std=self.config.initializer_range)
        elif isinstance(module, BatchedFbank):
            module.reset_buffers()


class ZidongModel(ZidongTowerFeatures, ZidongPreTrainedModel):
    def __init__(self, config: ZidongConfig):
        super().__init__(config)
        self.text_model = build_tower(config, "text")
        self.vision_model = build_tower(config, "vision")
        self.vision_pooling = vision_pooling(self.vision_model)
        self.speech_model = build_tower(config, "speech")
        self.fbank = BatchedFbank(sampling_rate=config.sampling_rate, num_mel_bins=config.num_mel_bins)
        spec_masks: list[nn.Module] = []
        if config.spec_augment_freq_mask:
            spec_masks.append(torchaudio.transforms.FrequencyMasking(config.spec_augment_freq_mask, iid_masks=True))
        if config.spec_augment_time_mask:
            spec_masks.append(torchaudio.transforms.TimeMasking(config.spec_augment_time_mask, iid_masks=True))
        self.spec_augment = nn.Sequential(*spec_masks)
        widths = {modality: tower_width(config, modality) for modality in MODALITIES}
        self.text_projection = nn.Linear(widths["text"], config.projection_dim, bias=False)
        self.vision_projection = nn.Linear(widths["vision"], config.projection_dim, bias=False)
        self.speech_projection = nn.Linear(widths["speech"], config.projection_dim, bias=False)
        # shape (1,), not a 0-d scalar: DeepSpeed broadcasts parameters as byte views, which 0-d tensors refuse
        self.logit_scale = nn.Parameter(torch.full((1,), float(config.logit_scale_init_value)))
        self.logit_bias = nn.Parameter(torch.full((1,), float(config.logit_bias_init_value)))
        self.fusion = ZidongFusionEncoder(config, widths)
        self.matching_head = nn.Linear(config.fusion_hidden_size, len(MATCHING_CLASSES))
        self.text_head = ZidongPredictionHead(config, config.text_config.vocab_size)
        patch_size = vision_patch_size(config)
        self.vision_head = (
            ZidongPredictionHead(config, patch_size * patch_size * getattr(config.vision_config, "num_channels", 3))
            if patch_size
            else None
        )
        self.speech_head = ZidongPredictionHead(config, config.num_mel_bins * config.speech_frame_stack)
        self.tower_inputs = {modality: tower_input(config, modality) for modality in MODALITIES}
        self.kept_tower_weights = KeptTowerWeights(config.kept_tower_weights)
        self.post_init()  # also gathers the towers' own `_no_split_modules` into this instance's
        if config.lora:  # after the init: peft's adapters start as their own rules say (B = 0: no change at first)
            add_lora(self, config.lora)

    def towers(self) -> dict[str, PreTrainedModel]:
        return {"text": self.text_model, "vision": self.vision_model, "speech": self.speech_model}

    @classmethod
    def from_pretrained_towers(
        cls,
        preset: str = "tiny",
        text: str | os.PathLike | None = None,
        vision: str | os.PathLike | None = None,
        speech: str | os.PathLike | None = None,
        **config_overrides,
    ) -> ZidongModel:
        """A new model whose towers start from local Hugging Face folders (the rest from `preset`).

        Each folder must hold a `config.json` and weights that `AutoModel.from_pretrained` reads; a tower given
        no folder is built from the preset. Raises ValueError naming the tower when a folder is unusable.
        """
        folders = {m: folder for m, folder in zip(MODALITIES, (text, vision, speech), strict=True) if folder}
        for modality, folder in folders.items():
            config_overrides[f"{modality}_config"] = pretrained_tower_config(modality, folder).to_dict()
        model = cls(ZidongConfig.from_preset(preset, **config_overrides))
        model.load_pretrained_towers(folders)
        return model

    def load_pretrained_towers(self, folders: Mapping[str, str | os.PathLike | None]) -> None:
        """Load each tower given a folder (modality -> local Hugging Face folder or None) from it; the weights of
        the checkpoint that zidong builds no module for (a pooler) are kept to be exported with the tower."""
        for modality, folder in folders.items():
            if folder:
                weights, held = pretrained_tower_weights(self.config, modality, folder)
                tower = self.towers()[modality]
                used = tower.state_dict().keys()
                tower.load_state_dict({name: weights[name] for name in used})
                for name in sorted(held - used):
                    self.kept_tower_weights.keep(modality, name, weights[name])
        self.config.kept_tower_weights = self.kept_tower_weights.listing()

    def get_input_embeddings(self) -> nn.Module:
        return self.text_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.text_model.set_input_embeddings(value)

    def resize_token_embeddings(
        self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None, mean_resizing: bool = True
    ) -> nn.Embedding:
        """Resize the text tower's vocabulary (transformers' rules) and the masked-text head's output with it:
        old rows are kept, new rows of the head start at the mean of the old ones (`mean_resizing`) or at zero."""
        embeddings = self.text_model.resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)
        size = embeddings.num_embeddings
        self.text_head.resize_output(size, mean_resizing)
        self.config.text_config.vocab_size = self.vocab_size = size  # both, as transformers' own method does
        return embeddings

    # ---------------------------------------------------------------------------------------- adapters

    # `switches`: the towers' own `output_hidden_states` / `output_attentions`, given only when set

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **switches: bool | None
    ) -> TowerOutput:
        return self.encode("text", input_ids, attention_mask, **switches)

    def encode_vision(self, pixel_values: torch.Tensor, **switches: bool | None) -> TowerOutput:
        return self.encode("vision", pixel_values, **switches)

    def encode_speech(
        self, input_values: torch.Tensor, attention_mask: torch.Tensor | None = None, **switches: bool | None
    ) -> TowerOutput:
        """Waveforms (n, samples) at 16 kHz -> tower states; features run batched on the model's device."""
        return self.encode("speech", input_values, attention_mask, **switches)

    def encode(
        self, modality: str, values: torch.Tensor, mask: torch.Tensor | None = None, **switches: bool | None
    ) -> TowerOutput:
        """The tower of `modality` on its inputs (`mask`: the text or speech attention mask; vision takes none),
        as the kind of input it reads says (`tower_inputs`, tower_inputs_zidong.py); `switches`: the tower's
        `output_hidden_states` / `output_attentions`."""
        return self.tower_inputs[modality].encode(self, values, mask, **switches)

    @property
    def speech_takes_features(self) -> bool:
        return self.speech_model.main_input_name == "input_features"

    def speech_steps(
        self, input_values: torch.Tensor, attention_mask: torch.Tensor, augment: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Waveforms -> normalised filterbank, `speech_frame_stack` frames a step (n, steps, bins x stack), and mask."""
        # the front end computes in float32 whatever the model's dtype; the tower gets its own dtype back
        features, frame_mask = self.fbank(input_values.float(), attention_mask.long().sum(dim=1))
        if augment and len(self.spec_augment):
            # (n, 1, bins, frames): the 4-D layout under which torchaudio draws a different mask per utterance
            features = self.spec_augment(features.transpose(1, 2)[:, None])[:, 0].transpose(1, 2)
        return normalize_and_stack(features, frame_mask, self.config.speech_frame_stack)

    def run_speech_tower(
        self, speech_inputs: torch.Tensor, input_mask: torch.Tensor, **switches: bool | None
    ) -> TowerOutput:
        """The speech tower on filterbank steps or waveforms (whichever it reads), cast to the tower's dtype.

        With `config.speech_chunk_rows` set, rows of similar length run together in chunks of that many, each
        padded only to its own longest row (`_speech_tower_in_chunks`): a batch drawn at random, whose lengths
        spread widely, then costs about what a batch of equal lengths costs. Not under lockstep (every process
        must make the same calls) nor when the tower's hidden states or attentions are asked for."""
        chunk = self.config.speech_chunk_rows
        if chunk and speech_inputs.shape[0] > chunk and not self.launch.lockstep and not any(switches.values()):
            return self._speech_tower_in_chunks(speech_inputs, input_mask, chunk)
        return self._speech_tower(speech_inputs, input_mask, **switches)

    def _speech_tower(
        self, speech_inputs: torch.Tensor, input_mask: torch.Tensor, **switches: bool | None
    ) -> TowerOutput:
        speech_inputs = speech_inputs.to(self.speech_model.dtype)
        name = "input_features" if self.speech_takes_features else "input_values"
        output = self.speech_model(
            **{name: speech_inputs}, attention_mask=input_mask.long(), **given_switches(switches)
        )
        states = output.last_hidden_state
        if states.shape[1] != input_mask.shape[1]:  # the tower subsamples: map the mask onto its token grid
            mask = self.speech_model._get_feature_vector_attention_mask(states.shape[1], input_mask.long()).bool()
        else:
            mask = input_mask.bool()
        return TowerOutput(states, mask, masked_mean(states, mask), output.hidden_states, output.attentions)

    def _speech_tower_in_chunks(self, speech_inputs: torch.Tensor, input_mask: torch.Tensor, chunk: int) -> TowerOutput:
        """The tower over the rows sorted by length, `chunk` rows a call, each call cut to its longest row; the
        outputs are put back in the rows' order, states and mask padded to the longest chunk's length. Every
        real position computes what one call over all rows computes (the tower masks padding), up to rounding."""
        lengths = input_mask.long().sum(dim=1)
        order = torch.argsort(lengths, stable=True)
        sorted_lengths = lengths[order].tolist()  # one host read: each chunk's width
        chunks = []
        for start in range(0, len(sorted_lengths), chunk):
            rows = order[start : start + chunk]
            width = sorted_lengths[min(start + chunk, len(sorted_lengths)) - 1]  # ascending: the chunk's last
            chunks.append(self._speech_tower(speech_inputs[rows, :width], input_mask[rows, :width]))
        steps = max(output.token_states.shape[1] for output in chunks)
        states = torch.cat([F.pad(o.token_states, (0, 0, 0, steps - o.token_states.shape[1])) for o in chunks])
        mask = torch.cat([F.pad(o.attention_mask, (0, steps - o.attention_mask.shape[1])) for o in chunks])
        restore = torch.argsort(order)
        return TowerOutput(states[restore], mask[restore], torch.cat([o.pooled for o in chunks])[restore])

    def _embed(self, modality: str, tower_output: TowerOutput) -> torch.Tensor:
        """The L2-normalised embedding in the model's dtype, normalised in float32 (under bf16 autocast a float32
        model's embeddings stay float32: they feed the contrastive logits and retrieval scores)."""
        projection = getattr(self, f"{modality}_projection")
        return F.normalize(projection(tower_output.pooled).float(), dim=-1).to(self.dtype)

    # ------------------------------------------------------------------------------------------ forward

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        text_attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        input_values: torch.Tensor | None = None,
        speech_attention_mask: torch.Tensor | None = None,
        text_present: torch.Tensor | None = None,
        vision_present: torch.Tensor | None = None,
        speech_present: torch.Tensor | None = None,
        return_loss: bool = False,
        loss_weights: Mapping[str, float] | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
    ) -> ZidongOutput:
        """Embeddings of every given modality and, with `return_loss`, the weighted objectives.

        `loss_weights` maps objective names (`OBJECTIVES`) to weights; by default only `contrastive` (1.0).
        `attention_mask` is accepted for `text_attention_mask` (`model(**tokenizer(texts, padding=True))`); an
        unknown keyword argument raises TypeError. `output_hidden_states` / `output_attentions` reach every tower:
        each tower's come back in `text_model_output`, `vision_model_output`, `speech_model_output` (CLIP's layout).
        """
        text_attention_mask = text_mask_argument(text_attention_mask, attention_mask, token_type_ids)
        switches = {"output_hidden_states": output_hidden_states, "output_attentions": output_attentions}
        weights = checked_loss_weights(loss_weights) if return_loss else {}
        inputs = modality_inputs(input_ids, text_attention_mask, pixel_values, input_values, speech_attention_mask)
        given = {"text": text_present, "vision": vision_present, "speech": speech_present}
        presence = batch_presence(inputs, given, self.device)
        lockstep = Lockstep(self, self.launch.lockstep)
        encoded = self._encode_batch(inputs, presence, lockstep, switches)
        losses: dict[str, torch.Tensor] = {}
        for objective in REGISTRY:  # objectives_zidong.py
            if objective.weighted(weights):
                losses.update(objective.losses(self, encoded, weights, lockstep))
        loss = None
        if return_loss:
            loss = self.logit_scale[0] * 0.0  # keeps a graph even when nothing in the batch can be scored
            for objective, weight in weights.items():
                if objective in losses:
                    loss = loss + weight * losses[objective]
            loss = lockstep.tie(loss)
        return ZidongOutput(
            loss=loss,
            losses=losses if return_loss else None,
            text_embeds=encoded.embeds["text"],
            vision_embeds=encoded.embeds["vision"],
            speech_embeds=encoded.embeds["speech"],
            text_present=presence["text"],
            vision_present=presence["vision"],
            speech_present=presence["speech"],
            logit_scale=self.logit_scale,
            **text_vision_logits(encoded.embeds, self.logit_scale, self.logit_bias, self.config.contrastive_loss),
            **{
                f"{modality}_model_output": tower_model_output(encoded.outputs[modality])
                for modality in MODALITIES
                if presence.has(modality)
            },
        )

    def _encode_batch(
        self, inputs: dict, presence: Presence, lockstep: Lockstep, switches: Mapping[str, bool | None]
    ) -> Encoded:
        """Each tower on the rows that have its modality (in lockstep, an absent one on a placeholder row)."""
        ran, outputs, embeds = {}, {}, dict.fromkeys(MODALITIES)
        for modality in MODALITIES:
            real = presence.has(modality)
            if not (real or lockstep.enabled):
                continue
            ran[modality] = inputs[modality] if real else lockstep.placeholder(modality)
            with lockstep.idle_work(not real):
                outputs[modality] = self.encode(modality, *ran[modality], **switches)
            embeds[modality] = scatter_rows(
                self._embed(modality, outputs[modality]), presence[modality], presence.rows[modality]
            )
            lockstep.keep(embeds[modality])  # a projection that no pair loss reads still takes part
        return Encoded(ran, outputs, presence, embeds)

    def prediction_heads(self) -> dict[str, nn.Module | None]:
        """The masked-modelling head of each modality (vision: None for a tower without patches)."""
        return {"text": self.text_head, "vision": self.vision_head, "speech": self.speech_head}


__all__ = [
    "MATCHING_CLASSES",
    "OBJECTIVES",
    "ZidongModel",
    "ZidongOutput",
    "ZidongPreTrainedModel",
]
