"""The base config and the best LSTM: synthetic scenes of coloured shapes, no download needed.

    python main.py --config=configs/scenes.py --workdir=runs/scenes_lstm
    python -m captioning.tools.grid --config=configs/scenes.py \
        --grid=configs/grids/scenes_decoding.py --seeds=0,1,2,3,4 --workdir=runs/seeds

Every other config starts from this one and changes a few fields; every field is defined here, with
one comment. Deterministic images (1-3 objects with shape, colour, size and position, and spatial
relations) with five grammar-made captions each; 6,000 training scenes, half of them with three
objects, and half the training images are drawn perturbed (background, colours, anti-aliasing,
turns). The default run (the README's first command) is configs/scenes_transformer.py: this
config's data and schedule with a Transformer. The decoder here is the Keras notebook's merge model
with spatial attention at its output (`merge_attention`: each word's LSTM state h_t looks up a
context in a 4x4 feature grid with positions) whose LSTM also reads a 32-d summary of what the
previous word's lookup saw (`feed_dim`); colour, shape and relation words weigh 3 in the loss
(`train.word_weights`), no dropout; 11 epochs; checkpoints are chosen by attribute + relation
accuracy + 0.1 CIDEr.

Result (the README's Results table; 2 CPU cores, AMD EPYC with AVX-512; test split, greedy,
repeats blocked; mean +- std over seeds 0-4; 4.6 minutes a run with a fresh cache): attribute
accuracy 0.956 +- 0.028, relation accuracy 0.763 +- 0.025, CIDEr 3.16 +- 0.10, BLEU-4 0.629 +-
0.012, METEOR 0.412 +- 0.003, chosen epoch 10.4 +- 0.5 of 11; test_perturbed attribute accuracy
0.928 +- 0.019, relation 0.766 +- 0.034; beam 3: 0.963 +- 0.016 / 0.804 +- 0.009 / CIDEr 3.36
+- 0.05. Unblocked (blocking off): 0.933 +- 0.025 / 0.773 +- 0.029.

configs/notes/scenes.md has the per-seed figures, where the errors are, and what each change
gave (why the feeding, the object shares, the word weights, no dropout and 6,000 scenes).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0  # Seeds the data order, dropout and parameter init; same seed = same run.

    config.data = ml_collections.ConfigDict()
    config.data.dataset = "scenes"  # scenes | flickr8k | flickr8k_kaggle | karpathy
    config.data.dir = ""  # Dataset folder; for scenes where images are rendered ('' = cache_dir).
    config.data.cache_dir = "~/.cache/captioning"  # Rendered scenes and feature stores live here.
    config.data.num_train = 6000  # Scenes only: number of training images.
    config.data.num_val = 300  # Scenes only: number of validation images.
    config.data.num_test = 300  # Scenes only: number of test images.
    config.data.image_size = 128  # Scenes only: rendered image side in pixels.
    config.data.min_count = 1  # Words seen fewer times in train captions become <unk>.
    config.data.min_word_len = 1  # Shorter words are dropped by cleaning (Keras notebook: 2).
    config.data.max_caption_len = 24  # Words per caption kept (longer ones are truncated).
    config.data.skip_bad_images = False  # Skip unreadable images (listed in the workdir) or raise.
    config.data.feature_residency = "auto"  # auto | device | host | disk: where feature rows live.
    config.data.karpathy_json = ""  # karpathy: which dataset_*.json when data.dir holds several.
    config.data.tfds_data_dir = ""  # coco_tfds: tensorflow-datasets data_dir ('' = TFDS default).
    # Scenes only: share of training images drawn perturbed (background, colours, anti-aliased
    # edges, turns; captions stay true), so the captioner learns shapes and colours, not pixels.
    config.data.train_jitter = 0.5
    # Scenes only: shares of training scenes with 1, 2 and 3 objects (validation and test: a third
    # each). Relations and look-alike objects are in the larger scenes, so they get more steps.
    config.data.train_objects = (0.15, 0.35, 0.5)
    config.data.perturbed_test = True  # Scenes only: also score test_perturbed (test, perturbed).

    config.encoder = ml_collections.ConfigDict()
    config.encoder.backbone = "resnet50"  # inception_v3 | resnet50 | vgg16 (keras.applications)
    config.encoder.layer = "conv2_block3_out"  # Keras layer to read ('' = the backbone's last).
    config.encoder.weights = "none"  # 'none' (random init) | 'imagenet' | path to a .h5/.keras file
    config.encoder.image_size = 128  # Backbone input side (the scenes are rendered at 128 px).
    # avg: [C] | avgmax: [2C] mean and max over locations | none: [H, W, C] grid (attention).
    config.encoder.pooling = "none"  # The attention looks up objects in the map.
    # pooling=none: area-resize the map to grid x grid (0 = as is). 32x32 -> 4x4: 16 cells of
    # 32x32 px, enough to tell left from right and top from bottom with 1-3 objects.
    config.encoder.grid = 4
    config.encoder.batch_size = 64  # Images per backbone call during feature export.
    config.encoder.dtype = "float32"  # Feature store dtype (float16 halves disk and memory).

    config.model = ml_collections.ConfigDict()
    # merge (the Keras notebook's) | merge_attention (merge + attention at the output, Lu et al.
    # 2017) | inject (Show and Tell) | attention (Show, Attend and Tell) | transformer.
    config.model.decoder = "merge_attention"
    config.model.embed_dim = 200  # Word embedding size.
    config.model.hidden_size = 256  # LSTM state and image projection size.
    config.model.dropout = 0.0  # Dropout on features and embeddings (configs/notes/scenes.md).
    config.model.use_image = True  # False zeroes the features: the image-blind ablation.
    config.model.glove_path = ""  # GloVe text file (.txt/.gz/.zip) to initialize embeddings.
    config.model.train_embeddings = True  # False freezes the (GloVe) embedding matrix.
    # Merge decoder: weight of an auxiliary loss in which the image embedding predicts which
    # words and frequent word pairs ("red circle") its captions use (0 = off).
    config.model.concept_loss = 0.0
    config.model.concept_pairs = 256  # Most frequent adjacent word pairs used as concepts.
    # Attention decoders: doubly stochastic regularization weight (Show-Attend-Tell's lambda; 0
    # here: it pulls attention towards uniform, configs/scenes_attention.py).
    config.model.attention_reg = 0.0
    config.model.attention_dim = 32  # Attention decoders: hidden size of the attention MLP.
    config.model.attention_positions = True  # Attention decoders, transformer: cell positions.
    config.model.feed_dim = 32  # merge_attention: LSTM reads an F-dim summary of the last lookup.
    config.model.dtype = "float32"  # float32 | bfloat16 matmuls (state, loss, optimizer stay fp32).
    # Transformer only (other decoders ignore the first four and refuse encoder_layers;
    # hidden_size is its d_model): blocks, attention heads (hidden_size / num_heads each), MLP
    # width (0 = 4 x hidden_size), word and 2-D grid positions (learned tables | sinusoidal), and
    # encoder blocks that let the grid's locations attend to each other before the words do.
    config.model.num_layers = 2  # Transformer: decoder blocks.
    config.model.num_heads = 4  # Transformer: attention heads per block.
    config.model.mlp_dim = 0  # Transformer: MLP hidden size (0 = 4 x hidden_size).
    config.model.positions = "learned"  # Transformer: learned | sinusoidal positions.
    config.model.encoder_layers = 0  # Transformer: encoder blocks over the grid's locations.

    config.train = ml_collections.ConfigDict()
    config.train.num_epochs = 11  # Passes over the training captions.
    config.train.batch_size = 128  # Captions per step.
    config.train.learning_rate = 3e-3  # Peak Adam learning rate.
    config.train.warmup_steps = 100  # Linear warm-up steps, then cosine decay to 10 % of peak.
    config.train.grad_clip = 1.0  # Global gradient-norm clip.
    config.train.weight_decay = 0.0  # AdamW decoupled weight decay (0 = plain Adam).
    config.train.num_buckets = 4  # Length buckets (one compiled step each); 1 = pad to max.
    config.train.log_every = 50  # Steps between training log lines.
    config.train.keep_checkpoints = 2  # Latest checkpoints kept (the best one is kept as well).
    config.train.checkpoint_every_steps = 0  # Also checkpoint mid-epoch every N steps (0 = off).
    # Validation metric, or a weighted sum of them, that picks the best checkpoint: CIDEr is flat
    # late in training and blind to whether the objects are right, so the accuracies lead.
    config.train.val_metric = "attribute_accuracy + relation_accuracy + 0.1*CIDEr"
    # Loss weight of chosen target words, groups "w1,w2=weight" separated by ';' ('' = all 1).
    # The scenes' colours, shapes and relation words carry what the image shows; the grammar's
    # free choices of phrasing otherwise dominate the cross-entropy.
    config.train.word_weights = (
        "red,green,blue,yellow,purple,white,circle,square,triangle,star,diamond,"
        "left,right,above,below,over,under,beneath,underneath,top,bottom=3"
    )
    config.train.patience = 0  # Stop after this many epochs without a better val metric (0=off).

    # Self-critical training (captioning/training/scst.py): a second phase that fine-tunes a
    # finished cross-entropy run on CIDEr-D (configs/scenes_scst.py).
    config.scst = ml_collections.ConfigDict()
    config.scst.init_from = ""  # Workdir of the cross-entropy run to start from ('' = no SCST).
    config.scst.init_checkpoint = "best"  # Its checkpoint to start from: best | latest | <step>.
    config.scst.num_samples = 5  # Captions sampled per image.
    # Reward: CIDEr-D, or a weighted sum with the scenes' per-caption attribute_accuracy (1 when
    # it names exactly the true objects) and relation_accuracy (share of its relations true).
    config.scst.reward = "CIDEr"
    config.scst.baseline = "mean"  # mean (of the image's other samples) | greedy (its caption).
    config.scst.learning_rate = 5e-5  # Adam learning rate (constant).
    config.scst.num_epochs = 5  # Passes over the training images.
    config.scst.batch_size = 50  # Images per step (x num_samples captions).
    # Weight beta of the penalty for straying from the starting model: each sample's reward less
    # beta x log(p / p_start) of its words, an estimate of KL(policy || start) (0 = off).
    config.scst.kl_weight = 0.0

    config.decode = ml_collections.ConfigDict()
    config.decode.method = "greedy"  # greedy | beam | sample
    config.decode.max_len = 24  # Longest generated caption in words.
    config.decode.beam_size = 3  # Beam width for method=beam.
    config.decode.length_penalty = 0.0  # Beam score = logp / length**alpha (0 = raw logp).
    config.decode.temperature = 1.0  # Sampling temperature for method=sample.
    config.decode.top_k = 0  # Sample among the k most likely words (0 = all).
    config.decode.batch_size = 256  # Images decoded per call.
    config.decode.seed = 0  # PRNG seed of method=sample (batch i draws with fold_in(seed, i)).
    # Never repeat a trigram nor say a word a third time in a row (all methods; False: as the
    # model says it). <pad>, <start> and <unk> are never emitted either way.
    config.decode.block_repeats = True

    config.eval = ml_collections.ConfigDict()
    config.eval.split = "test"  # Split scored by --mode=evaluate and at the end of training.
    config.eval.extra_splits = "test_perturbed"  # Also scored after training, when present (a,b).
    config.eval.tokenizer = "simple"  # simple (our cleaning) | ptb (Stanford PTB tokenizer, Java)
    config.eval.meteor = True  # METEOR needs Java; reported as skipped when Java is missing.
    config.eval.spice = False  # SPICE needs Java and Stanford CoreNLP jars; skipped if absent.
    config.eval.num_samples = 12  # Images drawn in samples.png.
    config.eval.attention_maps = False  # Attention decoder: also draw per-word attention PNGs.
    config.eval.checkpoint = "best"  # Checkpoint scored, captioning, served: best|latest|<step>.
    return config
