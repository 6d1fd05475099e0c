"""MS-COCO 2014, Karpathy splits (113,287 / 5,000 / 5,000 images, five captions each), from
tensorflow-datasets' `coco_captions`; InceptionV3 (ImageNet) 8x8x2048 maps, merge LSTM with
spatial attention at its output (`merge_attention`).

    tfds build coco_captions --data_dir=/data/tensorflow_datasets   # once, with internet
    python main.py --mode=export_features --config=configs/coco.py --workdir=runs/coco \
        --config.data.tfds_data_dir=/data/tensorflow_datasets
    python main.py --config=configs/coco.py --workdir=runs/coco \
        --config.data.tfds_data_dir=/data/tensorflow_datasets

Without TFDS, the same splits come from Karpathy's JSON and the COCO image folders
(`<dir>/train2014/`, `<dir>/val2014/`, as the JSON's `filepath` says):

    python main.py --config=configs/coco.py --workdir=runs/coco_karpathy \
        --config.data.dataset=karpathy --config.data.dir=/data/coco \
        --config.data.karpathy_json=dataset_coco.json

The feature store (123,287 x 8 x 8 x 2048 float16 values, about 30 GiB) may not fit in memory:
`data.feature_residency` keeps it on the host or on disk. The export reads every image once at
299 px: hours on CPU, use an accelerator. `merge_attention` rather than Show-Attend-Tell's
`attention` (`--config.model.decoder=attention` runs that on the same features) because its
lookups run in parallel after the LSTM scan, which counts at 566k captions x 30 epochs.

Result: not measured (no COCO images on this machine). Reference: Show, Attend and Tell (Table 1,
COCO, soft attention, VGG features) reports BLEU-1..4 70.7 / 49.2 / 34.4 / 24.3, METEOR 23.9;
scores with `--config.eval.tokenizer=ptb` (needs Java) are the ones comparable with published
ones. configs/notes/coco.md: disk and memory, the decoder's step cost, the schedule's sources.
"""

from configs import flickr8k


def get_config():
    config = flickr8k.get_config()  # InceptionV3, ImageNet weights, 299 px (configs/flickr8k.py).
    config.data.dataset = "coco_tfds"  # TFDS coco_captions: train + restval, val, test.
    config.data.min_word_len = 1  # Keep every word ("a"), as the anchors' tokens do.
    # Words seen more than 5 times (self-critical.pytorch prepro_labels.py word_count_threshold=5
    # keeps count > 5): about 9,500 words.
    config.data.min_count = 6
    config.data.max_caption_len = 16  # self-critical.pytorch prepro_labels.py max_length=16.

    config.encoder.layer = ""  # InceptionV3's last map, mixed10: 8x8x2048.
    config.encoder.pooling = "none"  # The 64 locations, for the attention.
    config.encoder.grid = 0  # The map as it is.
    config.encoder.dtype = "float16"  # 123,287 x 64 x 2048: 30 GiB (60 GiB as float32).

    config.model.decoder = (
        "merge_attention"  # captioning/models/merge_attention.py (docstring: why).
    )
    config.model.embed_dim = 512  # self-critical.pytorch input_encoding_size=512.
    config.model.hidden_size = 512  # self-critical.pytorch rnn_size=512.
    config.model.attention_dim = 512  # self-critical.pytorch att_hid_size=512.
    config.model.attention_positions = False  # Features only, as the anchors.
    config.model.train_embeddings = True  # Learned with the decoder, as the anchors (no GloVe).

    config.train.num_epochs = 30  # self-critical.pytorch README: max_epochs 30 (XE).
    config.train.batch_size = 50  # self-critical.pytorch: batch_size 10 images x seq_per_img 5.
    # self-critical.pytorch README: learning_rate 5e-4, x0.8 every 3 epochs (0.13x by the end;
    # our cosine decay ends at 0.1x).
    config.train.learning_rate = 5e-4
    config.train.warmup_steps = 2000  # Our choice: a fifth of an epoch (11,300 steps/epoch).
    config.train.log_every = 500  # Steps between log lines.

    config.decode.method = "beam"  # self-critical.pytorch evaluates with beam search.
    config.decode.beam_size = 3  # self-critical.pytorch opts.py: "Usually 2 or 3 works well".
    config.decode.max_len = 20  # self-critical.pytorch eval max_length=20.
    config.decode.batch_size = 64  # Beams tile the 64x2048 map per image: smaller batches.
    return config
