-- The study database. Only the sweep driver writes it (through a Ray Tune callback); trials never open it.
-- Every write is an upsert keyed by these primary keys, so replaying results (Ray does after a restore) never
-- duplicates a row.

-- What marks the file as a study database, and its schema version (analysis/db.py APPLICATION, SCHEMA_VERSION): one
-- row. A writer checks it before writing anything and refuses another application's file or a newer version's; a
-- file from before this table (our tables without it) is version 0, migrated when a writer opens it.
CREATE TABLE IF NOT EXISTS study_database (
    application      VARCHAR NOT NULL,
    schema_version   INTEGER NOT NULL,
    marked_at        TIMESTAMP NOT NULL,    -- when a writer created the file or migrated it to this version
    migrated_from    INTEGER                -- the version it was migrated from; null when created at this version
);

-- One row per launched sweep (a `launch.py grid|search` invocation; `resume` continues the same row).
CREATE TABLE IF NOT EXISTS sweeps (
    id               VARCHAR PRIMARY KEY,   -- e.g. smoke-20261126-130501-3f2a
    study            VARCHAR NOT NULL,      -- study name (smoke, demo, guide, or a file's name)
    kind             VARCHAR NOT NULL,      -- grid | search
    started_at       TIMESTAMP NOT NULL,
    ended_at         TIMESTAMP,             -- null while running or after a crash
    status           VARCHAR NOT NULL,      -- running | completed | interrupted (a signal, a full disk, a crash)
    planned_trials   INTEGER NOT NULL,
    model_init       VARCHAR,               -- pretrained | random | mixed: a random-init sweep is no finding about GPT-2
    git_commit       VARCHAR,
    package_versions JSON,                  -- {"torch": "2.13.0", ...}
    hardware         JSON,                  -- {"cpus": 2, "gpus": [...], "platform": ...}
    command_line     VARCHAR,
    storage_path     VARCHAR                -- where Ray keeps experiment state and checkpoints
);

-- One row per planned trial. Its id is derived from the sweep and the trial's full configuration.
CREATE TABLE IF NOT EXISTS trials (
    id                       VARCHAR PRIMARY KEY,
    sweep_id                 VARCHAR NOT NULL,
    study                    VARCHAR NOT NULL,
    dimension                VARCHAR NOT NULL,  -- the study dimension this trial belongs to (method, lora_rank, ...)
    "group"                  VARCHAR NOT NULL,  -- the variant compared within the dimension (full, lora_r8, ...)
    task                     VARCHAR NOT NULL,
    method                   VARCHAR NOT NULL,
    model                    VARCHAR NOT NULL,
    seed                     INTEGER NOT NULL,
    status                   VARCHAR NOT NULL
        -- interrupted: running when a signal (Ctrl-C, SIGTERM) stopped the sweep; `launch.py resume` runs it again
        CHECK (status IN ('pending', 'running', 'interrupted', 'completed', 'failed', 'diverged', 'stopped')),
    error                    VARCHAR,
    -- every hyperparameter, one typed column each (flat key with '.' as '_')
    task_name                VARCHAR,
    task_max_length          INTEGER,
    task_max_train_examples  INTEGER,
    task_max_eval_examples   INTEGER,
    task_balanced            BOOLEAN,
    task_source              VARCHAR,
    task_prompt_loss         BOOLEAN,
    task_num_generations     INTEGER,
    model_name               VARCHAR,
    model_init               VARCHAR,
    model_dropout            DOUBLE,
    model_n_layer            INTEGER,
    model_n_head             INTEGER,
    model_n_embd             INTEGER,
    model_init_seed          INTEGER,
    model_frozen_dtype       VARCHAR,           -- float32 | bfloat16 (what the method does not train)
    model_quantize           VARCHAR,           -- none | nf4 (QLoRA: the adapted projections' base weights in NF4)
    method_name              VARCHAR,
    method_k                 INTEGER,
    method_train_embeddings  BOOLEAN,
    lora_rank                INTEGER,
    lora_alpha               DOUBLE,
    lora_dropout             DOUBLE,
    lora_targets             VARCHAR,           -- comma-separated, GPT-2 order
    lora_layers              VARCHAR,           -- all | last:N | first:N | comma-separated indices
    lora_rslora              BOOLEAN,
    lora_lr_ratio            DOUBLE,            -- LoRA+: B's learning rate / A's (1 = plain LoRA)
    lora_dora                BOOLEAN,           -- DoRA: a trained magnitude per output unit
    lora_init                VARCHAR,           -- default | gaussian | pissa
    optim_name               VARCHAR,
    optim_lr                 DOUBLE,
    optim_weight_decay       DOUBLE,
    optim_beta1              DOUBLE,
    optim_beta2              DOUBLE,
    optim_eps                DOUBLE,
    optim_momentum           DOUBLE,
    optim_nesterov           BOOLEAN,
    schedule_name            VARCHAR,
    schedule_warmup_steps    INTEGER,
    schedule_warmup_ratio    DOUBLE,
    schedule_num_cycles      INTEGER,
    train_epochs             INTEGER,
    train_max_steps          INTEGER,
    train_batch_size         INTEGER,
    train_grad_accum         INTEGER,
    train_max_grad_norm      DOUBLE,
    train_eval_every         INTEGER,
    train_eval_at_start      BOOLEAN,
    train_baseline_eval      BOOLEAN,
    train_train_metrics      BOOLEAN,
    train_eval_batch_size    INTEGER,
    train_early_stopping_patience INTEGER,
    train_seed               INTEGER,
    train_device             VARCHAR,
    train_precision          VARCHAR,
    train_compile            BOOLEAN,
    train_activation_checkpointing BOOLEAN,
    train_log_every          INTEGER,
    train_checkpoint_every   INTEGER,
    train_max_new_tokens     INTEGER,
    train_group_by_length    BOOLEAN,
    train_export             BOOLEAN,
    dpo_beta                 DOUBLE,
    dpo_loss                 VARCHAR,
    dpo_label_smoothing      DOUBLE,
    dpo_init                 VARCHAR,
    config                   JSON NOT NULL,     -- the full flat configuration
    -- what the trial measured (null until it ends)
    steps                    INTEGER,
    trainable_params         BIGINT,
    total_params             BIGINT,
    tokens_seen              BIGINT,
    tokens_per_s             DOUBLE,
    padding_share            DOUBLE,
    peak_memory_mb           DOUBLE,            -- measured CUDA peak allocated on a GPU, else the memory account
    memory_source            VARCHAR,           -- cuda_peak | account
    weight_bytes             BIGINT,            -- memory account (sweeps/memory.py): parameters of model and head
    gradient_bytes           BIGINT,            --   gradients of the trainable parameters
    optimizer_state_bytes    BIGINT,            --   optimizer state tensors
    activation_bytes         BIGINT,            --   what autograd saved for the first micro-batch's backward pass
    memory_account_bytes     BIGINT,            --   their sum
    cuda_peak_allocated_bytes BIGINT,           -- CUDA only, peaks reset at the trial's start
    cuda_peak_reserved_bytes BIGINT,
    kept_bytes               BIGINT,            -- what a user keeps: the trainable tensors (LoRA: adapters + head)
    setup_seconds            DOUBLE,            -- model, data, method, task preparation, before the first step
    train_seconds            DOUBLE,            -- optimizer steps only (tokens_per_s divides by this)
    eval_seconds             DOUBLE,            -- evaluations and generations
    wall_seconds             DOUBLE,
    primary_metric           VARCHAR,           -- the task's own: accuracy, perplexity, preference_accuracy, ...
    higher_is_better         BOOLEAN,           -- the primary metric's direction, as the task declares it
    val_primary              DOUBLE,
    test_primary             DOUBLE,
    baseline_majority        DOUBLE,            -- test primary metric of always predicting the training split's most
                                                --   frequent class (ties: smallest id); null without class labels
                                                --   (alpaca, preference)
    baseline_step0           DOUBLE,            -- test primary metric before any training (step 0: base weights,
                                                --   fresh head); null with train_baseline_eval = false
    val_accuracy             DOUBLE,
    val_macro_f1             DOUBLE,
    val_loss                 DOUBLE,
    val_perplexity           DOUBLE,
    test_accuracy            DOUBLE,
    test_macro_f1            DOUBLE,
    test_loss                DOUBLE,
    test_perplexity          DOUBLE,
    result                   JSON,              -- the final record (per-class F1, notes, ...); its predictions
                                                --   and generations are in their own tables
    updated_at               TIMESTAMP NOT NULL
);

-- Columns added after the first release, for databases created before them (no-ops on new ones).
ALTER TABLE trials ADD COLUMN IF NOT EXISTS train_export BOOLEAN;
ALTER TABLE trials ADD COLUMN IF NOT EXISTS dpo_beta DOUBLE;
ALTER TABLE trials ADD COLUMN IF NOT EXISTS dpo_loss VARCHAR;
ALTER TABLE trials ADD COLUMN IF NOT EXISTS model_init_seed INTEGER;  -- version 2
ALTER TABLE trials ADD COLUMN IF NOT EXISTS dpo_label_smoothing DOUBLE;
ALTER TABLE trials ADD COLUMN IF NOT EXISTS dpo_init VARCHAR;
ALTER TABLE trials ADD COLUMN IF NOT EXISTS higher_is_better BOOLEAN;
ALTER TABLE trials ADD COLUMN IF NOT EXISTS memory_source VARCHAR;
ALTER TABLE trials ADD COLUMN IF NOT EXISTS weight_bytes BIGINT;
ALTER TABLE trials ADD COLUMN IF NOT EXISTS gradient_bytes BIGINT;
ALTER TABLE trials ADD COLUMN IF NOT EXISTS optimizer_state_bytes BIGINT;
ALTER TABLE trials ADD COLUMN IF NOT EXISTS activation_bytes BIGINT;
ALTER TABLE trials ADD COLUMN IF NOT EXISTS memory_account_bytes BIGINT;
ALTER TABLE trials ADD COLUMN IF NOT EXISTS cuda_peak_allocated_bytes BIGINT;
ALTER TABLE trials ADD COLUMN IF NOT EXISTS cuda_peak_reserved_bytes BIGINT;
ALTER TABLE trials ADD COLUMN IF NOT EXISTS kept_bytes BIGINT;
ALTER TABLE trials ADD COLUMN IF NOT EXISTS setup_seconds DOUBLE;
ALTER TABLE trials ADD COLUMN IF NOT EXISTS train_seconds DOUBLE;
ALTER TABLE trials ADD COLUMN IF NOT EXISTS eval_seconds DOUBLE;
ALTER TABLE trials ADD COLUMN IF NOT EXISTS train_baseline_eval BOOLEAN;
ALTER TABLE trials ADD COLUMN IF NOT EXISTS train_train_metrics BOOLEAN;
ALTER TABLE trials ADD COLUMN IF NOT EXISTS baseline_majority DOUBLE;
ALTER TABLE trials ADD COLUMN IF NOT EXISTS baseline_step0 DOUBLE;
ALTER TABLE trials ADD COLUMN IF NOT EXISTS lora_lr_ratio DOUBLE;  -- version 3
ALTER TABLE trials ADD COLUMN IF NOT EXISTS model_frozen_dtype VARCHAR;  -- version 4
ALTER TABLE trials ADD COLUMN IF NOT EXISTS model_quantize VARCHAR;  -- version 4
ALTER TABLE trials ADD COLUMN IF NOT EXISTS lora_dora BOOLEAN;  -- version 4
ALTER TABLE trials ADD COLUMN IF NOT EXISTS lora_init VARCHAR;  -- version 4
ALTER TABLE trials ADD COLUMN IF NOT EXISTS train_activation_checkpointing BOOLEAN;  -- version 4

-- Which (dimension, group) each trial serves. One configuration often serves several groups (method/lora is also
-- lora_targets/all when the study's base adapts every projection): it trains once, has one trials row (whose
-- dimension and "group" are its first membership, in study order) and one row here per membership. The guide reads
-- memberships from here (analysis/queries.py guide_trials), so a shared trial appears in each of its dimensions with
-- the same numbers. A dimension holds a trial once: two groups of one dimension are never the same configuration.
CREATE TABLE IF NOT EXISTS trial_groups (
    trial_id    VARCHAR NOT NULL,
    dimension   VARCHAR NOT NULL,
    "group"     VARCHAR NOT NULL,
    PRIMARY KEY (trial_id, dimension)
);

-- Databases written before trial_groups existed: each trial's own dimension and group is its one membership. Runs
-- whenever a writer opens the file (a no-op once done); a reader opening an older file that no writer has opened
-- since gets the same rows from a temporary view (analysis/db.py connect).
INSERT INTO trial_groups SELECT id, dimension, "group" FROM trials ON CONFLICT DO NOTHING;

-- Per-example outcomes of each trial's final weights on validation and test: what paired comparisons (A and B on the
-- same examples) and questions like "which messages does LoRA get wrong that full fine-tuning gets right?" read.
CREATE TABLE IF NOT EXISTS predictions (
    trial_id    VARCHAR NOT NULL,
    split       VARCHAR NOT NULL,   -- validation | test
    example     INTEGER NOT NULL,   -- index of the example in the split the trial evaluated
    label       INTEGER,            -- classification: the class id; preference pairs: 0 (the chosen answer)
    prediction  INTEGER,            -- the class (pair: 0 chosen, 1 rejected) the model preferred
    correct     BOOLEAN,            -- prediction = label
    loss        DOUBLE,             -- language modelling: the example's summed response-token loss, nats
    tokens      INTEGER,            -- language modelling: its scored response tokens
    PRIMARY KEY (trial_id, split, example)
);

-- Learning curves: every reported value of every trial.
CREATE TABLE IF NOT EXISTS metrics (
    trial_id  VARCHAR NOT NULL,
    step      INTEGER NOT NULL,
    split     VARCHAR NOT NULL,   -- train | validation | test
    name      VARCHAR NOT NULL,   -- loss, lr, tokens_per_s, accuracy, perplexity, ...; test at step 0: before training
    value     DOUBLE,
    PRIMARY KEY (trial_id, step, split, name)
);

-- Greedy generations that generating trials (instruction tuning, DPO) keep on fixed test prompts: what the guide
-- shows side by side and what analysis/judge.py asks a judge about. stage 'final' is the trial's trained weights;
-- 'start' the weights it started from (DPO keeps both: its answers are judged against its starting model's).
CREATE TABLE IF NOT EXISTS generations (
    trial_id   VARCHAR NOT NULL,
    stage      VARCHAR NOT NULL CHECK (stage IN ('final', 'start')),
    example    INTEGER NOT NULL,   -- index of the prompt in the test split: the same index is the same prompt in
                                   --   every trial of a task with the same data settings
    prompt     VARCHAR NOT NULL,   -- the prompt as the model saw it (decoded)
    reference  VARCHAR,            -- the dataset's reference answer (preference pairs: the chosen one)
    response   VARCHAR NOT NULL,   -- the greedy continuation, decoded, without the end-of-text token
    PRIMARY KEY (trial_id, stage, example)
);

-- Databases written before the generations table kept them in trials.result -> 'generations'. analysis/db.py
-- connect copies those rows here whenever a writer opens the file (a no-op for newer results, which have none) and
-- gives a reader of an older file a temporary view of the same name; the one SELECT of both is
-- analysis/db.py GENERATIONS_IN_RESULT.

-- One request to an LLM judge and what came back (analysis/judge.py; only that CLI writes here). Mode 'score' asks
-- once per generation (position 'only'): a 0-100 score given the prompt and the reference answer. Mode 'pairwise'
-- asks twice, the trial's response shown first and then second against an opponent (the reference answer, or for
-- DPO its starting model's generation of the same prompt); the pair is a win or a loss only when both orders agree,
-- else a tie (analysis/queries.py derives it). A row is written as its reply arrives, so an interrupted run resumes
-- with what is missing; a 'failed' row (no usable reply after the retries) is asked again by the next run.
CREATE TABLE IF NOT EXISTS judgments (
    trial_id          VARCHAR NOT NULL,
    example           INTEGER NOT NULL,
    judge_model       VARCHAR NOT NULL,
    rubric_version    VARCHAR NOT NULL,   -- changes whenever the judge's instructions change
    mode              VARCHAR NOT NULL CHECK (mode IN ('score', 'pairwise')),
    position          VARCHAR NOT NULL CHECK (position IN ('only', 'first', 'second')),  -- where the trial's
                                          --   response was shown
    opponent          VARCHAR CHECK (opponent IN ('reference', 'start')),  -- pairwise only
    score             DOUBLE,             -- score mode: 0-100
    preferred         VARCHAR CHECK (preferred IN ('response', 'opponent')),  -- pairwise: the judge's choice,
                                          --   mapped back from its letter
    parse_status      VARCHAR NOT NULL CHECK (parse_status IN ('ok', 'unparsed', 'failed')),
    raw_reply         VARCHAR,            -- the judge's reply, verbatim
    error             VARCHAR,            -- failed: the last error after the retries
    request_key       VARCHAR NOT NULL,   -- sha256 of (judge model, rubric version, mode, the messages sent): the
                                          --   cache key; an identical request reuses the reply
    cached            BOOLEAN NOT NULL,   -- the reply was reused, not asked (no tokens spent, no latency)
    prompt_tokens     INTEGER,
    completion_tokens INTEGER,
    latency_s         DOUBLE,
    judged_at         TIMESTAMP NOT NULL,
    PRIMARY KEY (trial_id, example, judge_model, rubric_version, mode, position)
);

-- A failed trial's error, kept when `launch.py resume --retry-failed` sets it back to pending to run it again (the
-- trials row then holds the new outcome): one row per retry.
CREATE TABLE IF NOT EXISTS trial_retries (
    trial_id         VARCHAR NOT NULL,
    sweep_id         VARCHAR NOT NULL,
    retried_at       TIMESTAMP NOT NULL,
    error            VARCHAR,               -- trials.error as it was when the trial ended failed
    PRIMARY KEY (trial_id, retried_at)
);
