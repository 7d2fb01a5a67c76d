"""Image datasets, VQ code extraction and the packed code dataset the GPT trains on."""

from masc_llamagen.data.codes import (
    CodeDataset,
    CodeFormatError,
    code_dtype,
    draw_variant,
    read_meta,
    save_codes,
)
from masc_llamagen.data.extract import extract_codes, variant_plan
from masc_llamagen.data.images import (
    ArrayImageDataset,
    DatasetNotFoundError,
    FashionMNIST,
    ImageFolderDataset,
    Twemoji,
    build_image_dataset,
    center_crop_pil,
    dataset_to_uint8,
    default_root,
    heldout_split,
)

__all__ = [
    "ArrayImageDataset",
    "CodeDataset",
    "CodeFormatError",
    "DatasetNotFoundError",
    "FashionMNIST",
    "ImageFolderDataset",
    "Twemoji",
    "build_image_dataset",
    "center_crop_pil",
    "code_dtype",
    "dataset_to_uint8",
    "default_root",
    "draw_variant",
    "extract_codes",
    "heldout_split",
    "read_meta",
    "save_codes",
    "variant_plan",
]
