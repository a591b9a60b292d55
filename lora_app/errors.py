"""The error types whose message is written for the user: the CLI prints them without a traceback
and the studio shows them in the page. Anything else is a bug and is reported as one."""


def user_errors() -> tuple[type[Exception], ...]:
    # imported here, not at module level: these modules pull in torch and transformers
    from lora_app.data import DataError
    from lora_app.inference.errors import InferenceError
    from lora_app.lora import AdapterLoadError, LoraConfigError, TargetError
    from lora_app.models import ModelLoadError
    from lora_app.training.config import TrainConfigError
    from lora_app.training.trainer import TrainingError

    return (DataError, InferenceError, AdapterLoadError, LoraConfigError, TargetError, ModelLoadError,
            TrainConfigError, TrainingError)
