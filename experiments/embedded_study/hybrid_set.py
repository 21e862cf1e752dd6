"""A synthetic set made of the images of one set and the captions of another (the same N, the same encoders):
which modality holds what a distillation changed.

    python -m experiments.embedded_study.hybrid_set --images SET_A --captions SET_B --out NEW_SET
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from covmatch.errors import CovMatchError
from covmatch.synthetic import MATCHING_FIELDS, SyntheticSet, check_metadata_matches


def hybrid(images_from: SyntheticSet, captions_from: SyntheticSet) -> SyntheticSet:
    """Images of ``images_from`` with the captions (token embeddings, masks, nearest tokens) of ``captions_from``;
    the metadata of ``captions_from`` (the same encoders, checked) plus where each half came from."""
    if len(images_from) != len(captions_from):
        sizes = f"{len(images_from)} and {len(captions_from)}"
        raise CovMatchError(f"the sets hold {sizes} pairs; a hybrid needs the same N")
    if images_from.text_features is not None or captions_from.text_features is not None:
        raise CovMatchError("sets with learned text features (--text-features) have no captions to exchange")
    expect = {k: images_from.metadata[k] for k in MATCHING_FIELDS if k in images_from.metadata}
    check_metadata_matches(captions_from.metadata, expect, where="the captions' set")
    metadata = dict(captions_from.metadata)
    metadata["hybrid"] = {
        "images": images_from.metadata.get("source"),
        "captions": captions_from.metadata.get("source"),
    }
    return SyntheticSet(
        images_from.images.clone(),
        captions_from.text_embeds.clone(),
        captions_from.attention_mask.clone(),
        metadata,
        None,
        captions_from.nearest_token_ids,
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.embedded_study.hybrid_set", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--images", type=Path, required=True, help="the set whose images the hybrid takes")
    parser.add_argument("--captions", type=Path, required=True, help="the set whose captions the hybrid takes")
    parser.add_argument("--out", type=Path, required=True, help="where the hybrid set is written")
    args = parser.parse_args(argv)
    try:
        images_from, captions_from = SyntheticSet.load(args.images), SyntheticSet.load(args.captions)
        for syn, path in ((images_from, args.images), (captions_from, args.captions)):
            syn.metadata["source"] = str(path)
        hybrid(images_from, captions_from).save(args.out)
    except CovMatchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
