# Decoders: cross-entropy training on cached features, best epoch by validation CIDEr-D.


rule train_xe:
    message:
        "Training decoder {wildcards.dec} on encoder {wildcards.enc} features (cross-entropy)"
    input:
        features=rules.features.output,
        labels=rules.prepare_captions.output.labels,
        vocab=rules.prepare_captions.output.vocab,
        refs=rules.prepare_captions.output.refs_val,
        info=rules.prepare_captions.output.info,
    output:
        f"{WORK}/decoders/{{enc}}/{{dec}}/xe.safetensors",
    params:
        cli=CAPTIONING,
        arch=lambda wc: decoder_cfg(wc)["arch"],
        dec=decoder_args,
        train=train_args,
        prep=lambda wc, input: os.path.dirname(input.info),
        seed=config["seed"],
        device=config["device"],
    log:
        f"logs/train_xe/{DS}-{{enc}}-{{dec}}.log",
    benchmark:
        f"logs/benchmarks/train_xe/{DS}-{{enc}}-{{dec}}.tsv"
    conda:
        "../envs/captioning.yaml"
    # Long jobs that unlock many others go first, so short evaluations fill the gaps at the end.
    priority: 2
    threads: config["train"]["threads"]
    resources:
        mem_mb=job("train_xe", "mem_mb"),
        runtime=job("train_xe", "runtime"),
        gpu=GPU,
    shell:
        "{params.cli} train --features {input.features} --prepared {params.prep} --decoder {params.arch}"
        " --decoder-config {params.dec:q} --train-config {params.train:q} --seed {params.seed}"
        " --threads {threads} --device {params.device} --out {output} --log-json {log}.json > {log} 2>&1"


rule train_scst:
    message:
        "Self-critical training of decoder {wildcards.dec} on encoder {wildcards.enc} features (CIDEr-D reward)"
    input:
        decoder=rules.train_xe.output,
        features=rules.features.output,
        labels=rules.prepare_captions.output.labels,
        refs=rules.prepare_captions.output.refs_val,
        info=rules.prepare_captions.output.info,
    output:
        f"{WORK}/decoders/{{enc}}/{{dec}}/scst.safetensors",
    params:
        cli=CAPTIONING,
        scst=as_json({**{k: v for k, v in config["scst"].items() if k not in ("encoders", "decoders", "quantization")},
                      **gpu_opts()}),
        prep=lambda wc, input: os.path.dirname(input.info),
        seed=config["seed"],
        device=config["device"],
    log:
        f"logs/train_scst/{DS}-{{enc}}-{{dec}}.log",
    benchmark:
        f"logs/benchmarks/train_scst/{DS}-{{enc}}-{{dec}}.tsv"
    conda:
        "../envs/captioning.yaml"
    priority: 1
    threads: config["train"]["threads"]
    resources:
        mem_mb=job("train_scst", "mem_mb"),
        runtime=job("train_scst", "runtime"),
        gpu=GPU,
    shell:
        "{params.cli} scst --decoder {input.decoder} --features {input.features} --prepared {params.prep}"
        " --scst {params.scst:q} --seed {params.seed} --threads {threads} --device {params.device}"
        " --out {output} --log-json {log}.json > {log} 2>&1"


rule train_kd:
    message:
        "Distilling decoder {wildcards.dec} on encoder {wildcards.enc} features from its family's teacher"
    input:
        # the teacher: the student's family decoder (itself, or what it is a variant of), trained as
        # distill.teacher_training says, on distill.teacher_encoder (default: the student's own encoder)
        teacher=lambda wc: "{0}/decoders/{1.enc}/{1.dec}/{1.dstage}.safetensors".format(WORK, kd_teacher(config, wc.enc, wc.dec)),
        teacher_features=lambda wc: f"{WORK}/features/{kd_teacher(config, wc.enc, wc.dec).enc}.h5",
        features=rules.features.output,
        labels=rules.prepare_captions.output.labels,
        refs=rules.prepare_captions.output.refs_val,
        info=rules.prepare_captions.output.info,
    output:
        f"{WORK}/decoders/{{enc}}/{{dec}}/kd.safetensors",
    params:
        cli=CAPTIONING,
        arch=lambda wc: decoder_cfg(wc)["arch"],
        dec=decoder_args,
        train=lambda wc, input: train_args(wc, {
            "teacher": input.teacher, "teacher_features": input.teacher_features,
            "kd_weight": config["distill"]["kd_weight"], "kd_temperature": config["distill"]["temperature"],
            "kd_mode": config["distill"]["mode"]}),
        prep=lambda wc, input: os.path.dirname(input.info),
        seed=config["seed"],
        device=config["device"],
    log:
        f"logs/train_kd/{DS}-{{enc}}-{{dec}}.log",
    benchmark:
        f"logs/benchmarks/train_kd/{DS}-{{enc}}-{{dec}}.tsv"
    conda:
        "../envs/captioning.yaml"
    priority: 1
    threads: config["train"]["threads"]
    resources:
        mem_mb=job("train_kd", "mem_mb"),
        runtime=job("train_kd", "runtime"),
        gpu=GPU,
    shell:
        "{params.cli} train --features {input.features} --prepared {params.prep} --decoder {params.arch}"
        " --decoder-config {params.dec:q} --train-config {params.train:q} --seed {params.seed}"
        " --threads {threads} --device {params.device} --out {output} --log-json {log}.json > {log} 2>&1"


# Training noise (config seeds): a dense reference trained again under seed + k, its own target.
use rule train_xe as train_xe_seed with:
    message:
        "Training decoder {wildcards.dec} on encoder {wildcards.enc} features (cross-entropy, seed + {wildcards.k})"
    output:
        f"{WORK}/decoders/{{enc}}/{{dec}}/xe_seed{{k}}.safetensors",
    params:
        seed=lambda wc: config["seed"] + int(wc.k),
    log:
        f"logs/train_xe/{DS}-{{enc}}-{{dec}}-seed{{k}}.log",
    benchmark:
        f"logs/benchmarks/train_xe/{DS}-{{enc}}-{{dec}}-seed{{k}}.tsv"


# A distilled student trained again under seed + k, from the same teacher.
use rule train_kd as train_kd_seed with:
    message:
        "Distilling decoder {wildcards.dec} on encoder {wildcards.enc} features from its family's teacher (seed + {wildcards.k})"
    output:
        f"{WORK}/decoders/{{enc}}/{{dec}}/kd_seed{{k}}.safetensors",
    params:
        seed=lambda wc: config["seed"] + int(wc.k),
    log:
        f"logs/train_kd/{DS}-{{enc}}-{{dec}}-seed{{k}}.log",
    benchmark:
        f"logs/benchmarks/train_kd/{DS}-{{enc}}-{{dec}}-seed{{k}}.tsv"
