"""Optional tensorflow-datasets builder for Flickr8k, fed from a manual-download folder.

The training code does not need it (it reads the folder through `registry.load_records`); it is for
users who want Flickr8k as a TFDS dataset. The manual folder has the layout of
`captioning.data.datasets.flickr8k` (same reader, same checks)::

    import tensorflow_datasets as tfds
    from captioning.data.datasets import tfds_flickr8k  # Registers the builder 'flickr8k'.

    builder = tfds_flickr8k.Flickr8k(data_dir="~/tensorflow_datasets")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir="/path/to/flickr8k"))
    ds = builder.as_dataset(split="train")  # {'image', 'image_id', 'captions'}

Splits are `train`, `val` (Flickr8k's "dev") and `test`.
"""

from __future__ import annotations

import tensorflow_datasets as tfds

from captioning.data.datasets import flickr8k


class Flickr8k(tfds.core.GeneratorBasedBuilder):
    """Flickr8k images with their five raw captions each."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Official train/dev/test split; 'dev' is named 'val'."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
    Put Flickr8k into the manual folder (download_config.manual_dir, default
    <data_dir>/downloads/manual/):
      Flickr8k.token.txt, Flickr_8k.trainImages.txt, Flickr_8k.devImages.txt,
      Flickr_8k.testImages.txt   (from Flickr8k_text.zip; a Flickr8k_text/ subfolder is fine)
      Flicker8k_Dataset/ or Images/   (the JPEGs, from Flickr8k_Dataset.zip)
    {flickr8k.WHERE_TO_GET}
    """

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(encoding_format="jpeg"),
                    "image_id": tfds.features.Text(),
                    "captions": tfds.features.Sequence(tfds.features.Text()),
                }
            ),
            homepage="http://nlp.cs.illinois.edu/HockenmaierGroup/8k-pictures.html",
            citation="Hodosh, Young and Hockenmaier. Framing Image Description as a Ranking Task: "
            "Data, Models and Evaluation Metrics. JAIR 47, 2013.",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        records = flickr8k.read_flickr8k(dl_manager.manual_dir)
        return {split: self._generate_examples(recs) for split, recs in records.items()}

    def _generate_examples(self, records):
        for r in records:
            yield (
                r.image_id,
                {"image": r.image_path, "image_id": r.image_id, "captions": list(r.captions)},
            )
