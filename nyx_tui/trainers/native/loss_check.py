"""Pre-flight for the noise and loss options (`training.*`): combinations that make no sense, said before
anything loads. Torch-free (the config check and the TUI's form run it).

sd-scripts' own rules (`verify_training_args`), with its severities: `adaptive_noise_scale` without a noise
offset and `scale_v_pred_loss_like_noise_pred` on a noise-prediction model are errors, as is
`v_pred_like_loss` on a v-prediction model; `zero_terminal_snr` on a noise-prediction model is a warning
(it trains, but the model cannot learn to denoise pure noise by predicting it). Nyx adds: an empty timestep
range is an error, and options that do nothing in this config (Huber settings with an L1/L2 loss, a random
strength without the strength) are warnings. Whether the model predicts noise or v is read from its files
(`families.detect`); when they do not say, the engine checks again after loading.
"""

from __future__ import annotations

from nyx_tui.config.errors import Problem, Severity
from nyx_tui.config.model import LossType, TrainingConfig, TrainingSection
from nyx_tui.families import detect

_HUBER_TYPES = (LossType.HUBER, LossType.SMOOTH_L1)
_HUBER_FIELDS = ("huber_c", "huber_schedule", "huber_scale")


def _prediction_type(cfg: TrainingConfig) -> str | None:
    """epsilon | v_prediction | flow as the base model's files say, or None when they do not (a repo id not
    in the cache, a checkpoint without the hint)."""
    if not cfg.model.pretrained.strip():
        return None
    return detect(cfg.model.pretrained).prediction_type


def loss_problems(cfg: TrainingConfig) -> list[Problem]:
    tr = cfg.training
    out: list[Problem] = []

    def add(key: str, message: str, fix: str, severity: Severity = "error") -> None:
        out.append(Problem(f"training.{key}", message, fix, severity=severity))

    if tr.full_bf16 and tr.mixed_precision.value != "bf16":
        add(
            "full_bf16",
            f"keeps the trained weights in bf16, and training.mixed_precision is {tr.mixed_precision.value!r}",
            'set training.mixed_precision = "bf16", or full_bf16 = false',
        )
    if tr.min_timestep >= tr.max_timestep:
        add(
            "min_timestep",
            f"is {tr.min_timestep}, not below training.max_timestep ({tr.max_timestep}): no timestep is left to "
            "train on (max_timestep is exclusive)",
            f"lower min_timestep below {tr.max_timestep}, or raise max_timestep (at most 1000)",
        )
    if tr.adaptive_noise_scale and not tr.noise_offset:
        add(
            "adaptive_noise_scale",
            "is added to the noise offset, and training.noise_offset is 0",
            "set training.noise_offset (e.g. 0.05), or adaptive_noise_scale = 0",
        )
    if tr.noise_offset_random_strength and not tr.noise_offset:
        add(
            "noise_offset_random_strength",
            "does nothing without training.noise_offset",
            "set training.noise_offset, or noise_offset_random_strength = false",
            "warning",
        )
    if tr.ip_noise_gamma_random_strength and not tr.ip_noise_gamma:
        add(
            "ip_noise_gamma_random_strength",
            "does nothing without training.ip_noise_gamma",
            "set training.ip_noise_gamma (e.g. 0.1), or ip_noise_gamma_random_strength = false",
            "warning",
        )
    if "multires_noise_discount" in tr.model_fields_set and not tr.multires_noise_iterations:
        add(
            "multires_noise_discount",
            "does nothing while training.multires_noise_iterations is 0",
            "set training.multires_noise_iterations (e.g. 6), or remove multires_noise_discount",
            "warning",
        )
    if tr.loss_type not in _HUBER_TYPES:
        for name in _HUBER_FIELDS:
            if name in tr.model_fields_set:
                add(
                    name,
                    f"only applies to loss_type huber or smooth_l1, and training.loss_type is {tr.loss_type.value}",
                    f'set training.loss_type = "huber", or remove {name}',
                    "warning",
                )
    if tr.zero_terminal_snr or tr.scale_v_pred_loss_like_noise_pred or tr.v_pred_like_loss:
        out += _prediction_problems(cfg, _prediction_type(cfg))
    return out


def _prediction_problems(cfg: TrainingConfig, prediction: str | None) -> list[Problem]:
    """The options that depend on what the model predicts (noise or v); nothing when that is not known yet."""
    tr = cfg.training
    out: list[Problem] = []
    if prediction == "epsilon":
        if tr.zero_terminal_snr:
            out.append(
                Problem(
                    "training.zero_terminal_snr",
                    "is meant for v-prediction models, and the base model predicts noise (epsilon): at the last "
                    "timestep the input is pure noise, and the training is not what you expect",
                    "use a v-prediction model, or set zero_terminal_snr = false",
                    severity="warning",
                )
            )
        if tr.scale_v_pred_loss_like_noise_pred:
            out.append(
                Problem(
                    "training.scale_v_pred_loss_like_noise_pred",
                    "is for v-prediction models, and the base model predicts noise (epsilon)",
                    "set scale_v_pred_loss_like_noise_pred = false",
                )
            )
    if prediction == "v_prediction" and tr.v_pred_like_loss:
        out.append(
            Problem(
                "training.v_pred_like_loss",
                "adds a v-prediction-like loss to a noise-prediction model, and the base model already predicts v",
                "set v_pred_like_loss = 0",
            )
        )
    return out


def loss_metadata(tr: TrainingSection) -> dict[str, object]:
    """The noise and loss options as sd-scripts records them in a LoRA's `ss_*` metadata; an option that is
    off is None (left out of the file), as sd-scripts' unset arguments are."""
    return {
        "ss_multires_noise_iterations": tr.multires_noise_iterations or None,
        "ss_multires_noise_discount": tr.multires_noise_discount,
        "ss_adaptive_noise_scale": tr.adaptive_noise_scale or None,
        "ss_zero_terminal_snr": tr.zero_terminal_snr,
        "ss_min_snr_gamma": tr.min_snr_gamma or None,
        "ss_ip_noise_gamma": tr.ip_noise_gamma or None,
        "ss_debiased_estimation": tr.debiased_estimation_loss,
        "ss_noise_offset_random_strength": tr.noise_offset_random_strength,
        "ss_ip_noise_gamma_random_strength": tr.ip_noise_gamma_random_strength,
        "ss_loss_type": tr.loss_type.value,
        "ss_huber_schedule": tr.huber_schedule.value,
        "ss_huber_scale": tr.huber_scale,
        "ss_huber_c": tr.huber_c,
    }
