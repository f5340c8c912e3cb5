"""The report model: a Swin image encoder feeding a T5 text decoder through a linear projection.

The decoder's cross-attention over the Swin token grid is what :mod:`neural_core.salience` turns into a per-patch
salience score, so both halves are built with ``attn_implementation="eager"``: SDPA returns no attention weights in
transformers 5.

Saved in Hugging Face format: ``swin/`` and ``t5/`` (``config.json`` + ``model.safetensors`` each), ``projection.safetensors``
and ``report_model.json`` (our :class:`ReportModelConfig`). Real local checkpoints (a Swin directory, a T5 or
Clinical-T5 directory) can be given in the config instead of the sizes.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn
from safetensors.torch import load_file, save_file
from transformers import SwinConfig, SwinModel, T5Config, T5ForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutput, Seq2SeqLMOutput

from ..config import ReportModelConfig
from ..errors import ModelLoadError

log = logging.getLogger(__name__)

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class BackboneTokens(nn.Module):
    """A CNN backbone as a token encoder: its stride-16 feature map, flattened row-major into ``G*G`` tokens.

    *Shapes*: (B, 1, S, S) in [-1024, 1024] -> ``last_hidden_state`` (B, (S/16)^2, C16)"""

    def __init__(self, name: str, *, pretrained: bool, frozen: bool, image_size: int):
        super().__init__()
        from .backbones import create_backbone

        self.name, self.frozen, self.image_size = name, frozen, int(image_size)
        self.backbone = create_backbone(name, pretrained=pretrained)
        self.hidden_size = int(self.backbone.channels["s16"])
        if frozen:
            self.backbone.requires_grad_(False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.frozen:
            self.backbone.eval()   # frozen means BatchNorm statistics too
            with torch.no_grad():
                h = self.backbone(pixel_values, stop_at="s16")["s16"]
        else:
            h = self.backbone(pixel_values, stop_at="s16")["s16"]
        return h.flatten(2).transpose(1, 2)


class ReportModel(nn.Module):
    """Image encoder (Swin, or a pretrained CNN backbone) -> projection -> T5 decoder.

    Shapes:
        pixel_values: (B, 1, S, S) float in [-1024, 1024] (the torchxrayvision convention), S = ``cfg.image_size``
        encoder tokens: (B, G*G, d_model), G = ``cfg.token_grid``
        labels: (B, T) token ids, padding = ``pad_token_id`` (turned into -100 for the loss)
        cross-attentions: per decoder layer (B, heads, T, G*G)
    """

    def __init__(self, cfg: ReportModelConfig, *, pad_token_id: int = 0, eos_token_id: int = 1,
                 swin: SwinModel | None = None, t5: T5ForConditionalGeneration | None = None,
                 pretrained_encoder: bool = True):
        super().__init__()
        self.cfg = cfg
        self.t5 = t5 if t5 is not None else self._build_t5(cfg, pad_token_id, eos_token_id)
        if cfg.encoder == "swin":
            self.swin = swin if swin is not None else self._build_swin(cfg)
            self.cnn = None
            enc_dim = self.swin.config.hidden_size if hasattr(self.swin.config, "hidden_size") \
                else self.swin.num_features
            self.in_channels = self.swin.config.num_channels
        else:
            self.swin = None
            self.cnn = BackboneTokens(cfg.encoder, pretrained=pretrained_encoder, frozen=cfg.freeze_encoder,
                                      image_size=cfg.image_size)
            enc_dim = self.cnn.hidden_size
            self.in_channels = 1
        self.proj = nn.Sequential(nn.Linear(enc_dim, self.t5.config.d_model), nn.LayerNorm(self.t5.config.d_model))
        # The T5 text encoder is never run (the decoder reads the Swin tokens), so its blocks get no gradient;
        # freezing them keeps DDP from waiting for gradients that never come and AdamW from storing their state.
        for p in list(self.t5.encoder.block.parameters()) + list(self.t5.encoder.final_layer_norm.parameters()):
            p.requires_grad_(False)

    # -- construction -------------------------------------------------------------------------------------------
    @staticmethod
    def _build_swin(cfg: ReportModelConfig) -> SwinModel:
        if cfg.swin_checkpoint:
            try:
                return SwinModel.from_pretrained(cfg.swin_checkpoint, attn_implementation="eager",
                                                 add_pooling_layer=False, local_files_only=True)
            except (OSError, ValueError) as err:
                raise ModelLoadError(f"cannot load Swin checkpoint {cfg.swin_checkpoint}: {err}") from err
        sc = SwinConfig(image_size=cfg.image_size, patch_size=cfg.swin_patch, num_channels=1,
                        embed_dim=cfg.swin_embed_dim, depths=list(cfg.swin_depths), num_heads=list(cfg.swin_heads),
                        window_size=cfg.swin_window, hidden_dropout_prob=cfg.dropout,
                        attention_probs_dropout_prob=0.0, drop_path_rate=0.05)
        sc._attn_implementation = "eager"
        return SwinModel(sc, add_pooling_layer=False)

    @staticmethod
    def _build_t5(cfg: ReportModelConfig, pad_id: int, eos_id: int) -> T5ForConditionalGeneration:
        if cfg.t5_checkpoint:
            try:
                return T5ForConditionalGeneration.from_pretrained(cfg.t5_checkpoint, attn_implementation="eager",
                                                                  local_files_only=True)
            except (OSError, ValueError) as err:
                raise ModelLoadError(f"cannot load T5 checkpoint {cfg.t5_checkpoint}: {err}") from err
        tc = T5Config(vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.d_kv, d_ff=cfg.d_ff,
                      num_layers=cfg.num_layers, num_decoder_layers=cfg.num_layers, num_heads=cfg.num_heads,
                      dropout_rate=cfg.dropout, pad_token_id=pad_id, eos_token_id=eos_id,
                      decoder_start_token_id=pad_id, feed_forward_proj="gated-gelu", tie_word_embeddings=True)
        tc._attn_implementation = "eager"
        return T5ForConditionalGeneration(tc)

    # -- forward ------------------------------------------------------------------------------------------------
    def prepare_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[-1024, 1024] grey -> what the Swin expects (1 channel as is; 3 channels ImageNet-normalised)."""
        x = pixel_values / 1024.0
        if self.in_channels == 3:
            x = (x + 1) / 2
            mean = x.new_tensor(_IMAGENET_MEAN).view(1, 3, 1, 1)
            std = x.new_tensor(_IMAGENET_STD).view(1, 3, 1, 1)
            x = (x.expand(-1, 3, -1, -1) - mean) / std
        return x

    def encoder_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The image encoder's tokens before the projection, (B, G*G, C): what a frozen encoder lets training
        cache once (:mod:`neural_core.train.features`)."""
        if self.cnn is not None:
            return self.cnn(pixel_values)
        return self.swin(pixel_values=self.prepare_pixels(pixel_values)).last_hidden_state

    def encode(self, pixel_values: torch.Tensor) -> BaseModelOutput:
        return self.encode_tokens(self.encoder_tokens(pixel_values))

    def encode_tokens(self, tokens: torch.Tensor) -> BaseModelOutput:
        """Projection of encoder tokens (B, G*G, C) into the decoder width (B, G*G, d_model)."""
        return BaseModelOutput(last_hidden_state=self.proj(tokens.to(self.proj[0].weight.dtype)))

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor, *, output_attentions: bool = False,
                encoder_outputs: BaseModelOutput | None = None,
                loss_mask: torch.Tensor | None = None) -> Seq2SeqLMOutput:
        """Teacher-forced pass. Padding in ``labels`` is masked out of the loss (-100), and so is every position
        where ``loss_mask`` (B, T) bool is False: those tokens are still read (the decoder sees them and attends
        from them) but never taught as text to write."""
        enc = encoder_outputs if encoder_outputs is not None else self.encode(pixel_values)
        pad = self.t5.config.pad_token_id
        decoder_input_ids = self.t5.prepare_decoder_input_ids_from_labels(labels=labels)
        decoder_mask = torch.ones_like(labels)
        decoder_mask[:, 1:] = (labels[:, :-1] != pad).long()  # position t sees token t-1; the start token is real
        loss_labels = labels.masked_fill(labels == pad, -100)
        if loss_mask is not None:
            loss_labels = loss_labels.masked_fill(~loss_mask.bool(), -100)
        return self.t5(encoder_outputs=enc, decoder_input_ids=decoder_input_ids,
                       decoder_attention_mask=decoder_mask, labels=loss_labels,
                       output_attentions=output_attentions, return_dict=True, use_cache=False)

    @torch.no_grad()
    def generate(self, pixel_values: torch.Tensor, *, max_new_tokens: int | None = None, num_beams: int = 1,
                 encoder_outputs: BaseModelOutput | None = None) -> torch.Tensor:
        enc = encoder_outputs if encoder_outputs is not None else self.encode(pixel_values)
        n = enc.last_hidden_state.shape[0]
        mask = torch.ones(enc.last_hidden_state.shape[:2], dtype=torch.long, device=enc.last_hidden_state.device)
        return self.t5.generate(encoder_outputs=enc, attention_mask=mask, num_beams=num_beams,
                                max_new_tokens=max_new_tokens or self.cfg.max_report_tokens, do_sample=False,
                                # a small decoder loops on one phrase without these (seen: "opacity opacity ...")
                                repetition_penalty=1.2, no_repeat_ngram_size=3,
                                decoder_start_token_id=self.t5.config.decoder_start_token_id,
                                pad_token_id=self.t5.config.pad_token_id,
                                eos_token_id=self.t5.config.eos_token_id)[:n]

    @property
    def token_grid(self) -> tuple[int, int]:
        """(rows, cols) of the encoder token grid, read off the Swin config (works for real checkpoints too)."""
        if self.cnn is not None:
            return self.cnn.image_size // 16, self.cnn.image_size // 16
        sc = self.swin.config
        side = sc.image_size // sc.patch_size // 2 ** (len(sc.depths) - 1)
        return side, side

    @property
    def image_size(self) -> int:
        return self.cnn.image_size if self.cnn is not None else int(self.swin.config.image_size)

    # -- persistence --------------------------------------------------------------------------------------------
    def save_pretrained(self, out: str | Path, *, fp16: bool = False) -> None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        dtype = torch.float16 if fp16 else None
        subs = ["t5"]
        if self.swin is not None:
            self.swin.save_pretrained(out / "swin", safe_serialization=True)
            subs.append("swin")
        else:
            (out / "encoder").mkdir(exist_ok=True)
            sd = {k: v.detach().cpu().contiguous() for k, v in self.cnn.backbone.state_dict().items()}
            save_file(sd, str(out / "encoder" / "model.safetensors"), metadata={"format": "pt"})
            subs.append("encoder")
        self.t5.save_pretrained(out / "t5", safe_serialization=True)
        if dtype is not None:  # rewrite the weights in half precision to fit the asset budget
            for sub, name in ((s_, "model.safetensors") for s_ in subs):
                p = out / sub / name
                sd = load_file(str(p))
                save_file({k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}, str(p),
                          metadata={"format": "pt"})
        proj = {k: (v.to(dtype) if dtype else v).contiguous() for k, v in self.proj.state_dict().items()}
        save_file(proj, str(out / "projection.safetensors"))
        (out / "report_model.json").write_text(json.dumps(self.cfg.to_dict(), indent=2))

    @classmethod
    def from_pretrained(cls, path: str | Path, map_location: str | torch.device = "cpu") -> "ReportModel":
        path = Path(path)
        cfg = None
        if (path / "report_model.json").exists():
            cfg = ReportModelConfig.from_dict(json.loads((path / "report_model.json").read_text()))
        enc = path / ("swin/config.json" if cfg is None or cfg.encoder == "swin" else "encoder/model.safetensors")
        need = [path / "report_model.json", enc, path / "t5" / "config.json", path / "projection.safetensors"]
        missing = [str(p.relative_to(path)) for p in need if not p.exists()]
        if missing:
            raise ModelLoadError(f"{path} is not a report model directory (missing {', '.join(missing)})")
        t5 = T5ForConditionalGeneration.from_pretrained(path / "t5", attn_implementation="eager",
                                                        local_files_only=True, dtype=torch.float32)
        if cfg.encoder == "swin":
            swin = SwinModel.from_pretrained(path / "swin", attn_implementation="eager", add_pooling_layer=False,
                                             local_files_only=True, dtype=torch.float32)
            model = cls(cfg, swin=swin, t5=t5)
        else:
            model = cls(cfg, t5=t5, pretrained_encoder=False)
            sd = {k: v.float() for k, v in load_file(str(enc)).items()}
            try:
                model.cnn.backbone.load_state_dict(sd, strict=True)
            except RuntimeError as err:
                raise ModelLoadError(f"{enc} does not fit the {cfg.encoder} encoder: {err}") from None
        proj = {k: v.float() for k, v in load_file(str(path / "projection.safetensors")).items()}
        model.proj.load_state_dict(proj)
        return model.to(map_location).eval()
