"""Score distillation of an EDM teacher into a GET generator: DMD, DMD2, and the parts a family of such methods shares.

Building blocks for the family
------------------------------
Library pieces with no dependence on a training script; each is a pure function or a small module with its own tests.

``get.distill.dmd`` (DMD / DMD2; EDM space, sigma from the ascending 1000-point Karras grid):

* settings and noise levels: ``DMDSettings`` (the papers' values), ``karras_sigmas``, ``index_range``,
  ``sample_sigma``;
* distribution matching: ``dm_gradient`` (g = (D_fake - D_real) / mean|x - D_real|), ``surrogate_loss`` (gradient
  g / numel in x), ``distribution_matching_loss`` (both, for any denoiser callables D(x; sigma, labels));
  ``tests/test_dmd_mechanism.py`` trains a Gaussian generator with them against exact denoisers;
* fake-score training: ``edm_loss_weight``, ``denoising_loss``, ``fake_score_loss``;
* DMD's regression: ``regression_loss`` (LPIPS by default; missing weights are an error naming the files, another
  loss only when asked for by name);
* DMD2's GAN: ``GANHead`` (the official head on the fake network's bottleneck), ``gan_logits``,
  ``gan_generator_loss``, ``gan_discriminator_loss``, ``bottleneck_shape``;
* fake scores: ``make_fake_score`` ('copy' / 'residual' / 'scratch'), ``fake_score_from_teacher`` (a copy without
  the never-used augmentation layer and with dropout 0, so DDP needs no find_unused_parameters),
  ``small_fake_score``, ``ResidualFakeScore``, ``is_edm_network``;
* one iteration's objectives: ``generator_loss``, ``critic_loss``, ``Critic`` (the critic as one module for DDP);
* schedules and multi-step generators: ``is_generator_turn`` (TTUR), ``generator_input``, ``backward_simulation``,
  ``sample_generator``; labels: ``one_hot``.

``get.distill.real_data`` (real images for methods with a discriminator):

* ``RealSource``: ``sample(batch_size)`` -> images (B, C, R, R) float32, int64 labels or None, seeded per rank,
  ``state_dict`` / ``load_state_dict`` for exact resume;
* sources: ``TeacherSamples`` (the analytic teacher's exact samples, its default), ``PairImages`` (a pair folder's
  teacher images), ``NpzImages`` (EDM / clean-fid ``arr_0`` uint8), ``PngFolder`` (EDM dataset_tool PNGs +
  ``dataset.json``), ``Cifar10Binary`` (the binary release; the pickled one is refused);
* ``make_real_source(spec, teacher, ...)`` picks one from a string, ``default_real_spec(teacher)`` the default;
  every file problem is a ``RealDataError`` naming the file.

``get.distill.disback`` (DisBack, docs/DISTILL.md "DisBack"):

* the degradation path folder (``path.json`` + one safetensors file per node, sha256-verified): ``load_path``,
  ``read_node``, ``load_node`` (strict: wrong, missing or extra keys are a ``PathError`` naming the file and keys);
* Algorithm 1: ``record_degradation`` (denoising score matching alone against the frozen initial generator, exact
  resume) with ``DegradationSettings`` (``paper_64x64``);
* Algorithm 2: ``BacktrackingSchedule`` (step -> target node; ``paper_64x64``, ``uniform``, ``parse``) and
  ``BacktrackingTarget`` (the switching real score, ``state_dict`` / ``load_state_dict`` for exact resume).

``train/train_dmd.py`` uses ``regression_loss`` (DMD) and ``make_real_source`` (DMD2's real data, ``--real``).
Not here yet: the training loop as one family and per-method state objects for resume.
"""
