# Encoders: make each encoder's weights (file, package or in-domain pretraining), then
# extract its features once for the whole dataset.


rule encoder_weights:
    message:
        "Making the weights of encoder {wildcards.enc}"
    input:
        unpack(encoder_weight_inputs),
        info=rules.prepare_captions.output.info,
    output:
        f"{WORK}/encoders/{{enc}}.safetensors",
    params:
        cli=CAPTIONING,
        cfg=encoder_cfg,
        pretrain=lambda wc: as_json(encoder_cfg(wc).get("pretrain", {})),
        objects=lambda wc, input: f"--objects {input.objects}" if "objects" in input.keys() else "",
        prep=lambda wc, input: os.path.dirname(input.info),
        seed=config["seed"],
        device=config["device"],
    log:
        f"logs/encoder_weights/{DS}-{{enc}}.log",
    benchmark:
        f"logs/benchmarks/encoder_weights/{DS}-{{enc}}.tsv"
    conda:
        "../envs/captioning.yaml"
    threads: 2
    resources:
        mem_mb=job("encoder_weights", "mem_mb"),
        runtime=job("encoder_weights", "runtime"),
        gpu=lambda wc: GPU if encoder_cfg(wc).get("weights", "pretrain") == "pretrain" else 0,
    shell:
        "{params.cli} encoder --timm-name {params.cfg[timm_name]} --img-size {params.cfg[img_size]}"
        " --weights {params.cfg[weights]} {params.objects} --prepared {params.prep}"
        " --pretrain {params.pretrain:q} --seed {params.seed} --device {params.device}"
        " --out {output} --log-json {log}.json > {log} 2>&1"


# extract.shards > 1 (COCO scale): features_shard encodes one contiguous slice of the images per job
# (temporary files), and features merges them into the same file one job would write; with 1 shard,
# features extracts everything itself and features_shard is never planned.
SHARDS = config["extract"]["shards"]


rule features_shard:
    message:
        "Extracting features of {DS} with encoder {wildcards.enc}, shard {wildcards.shard} of {params.shards}"
    input:
        encoder=rules.encoder_weights.output,
        images=rules.prepare_captions.output.images,
        info=rules.prepare_captions.output.info,
    output:
        temp(f"{WORK}/features/{{enc}}.shard{{shard}}.h5"),
    wildcard_constraints:
        shard="[0-9]+",
    params:
        cli=CAPTIONING,
        prep=lambda wc, input: os.path.dirname(input.info),
        batch_size=config["extract"]["batch_size"],
        device=config["device"],
        shards=SHARDS,
    log:
        f"logs/features_shard/{DS}-{{enc}}.shard{{shard}}.log",
    benchmark:
        f"logs/benchmarks/features_shard/{DS}-{{enc}}.shard{{shard}}.tsv"
    conda:
        "../envs/captioning.yaml"
    threads: 2
    resources:
        mem_mb=job("features", "mem_mb"),
        runtime=job("features", "runtime"),
        gpu=GPU,
    shell:
        "{params.cli} extract --encoder {input.encoder} --prepared {params.prep} --out {output}"
        " --batch-size {params.batch_size} --device {params.device}"
        " --shard {wildcards.shard} --shards {params.shards} > {log} 2>&1"


rule features:
    message:
        "Extracting features of {DS} with encoder {wildcards.enc}" if SHARDS == 1 else
        "Merging the {SHARDS} feature shards of {DS} with encoder {wildcards.enc}"
    input:
        **(
            dict(
                encoder=rules.encoder_weights.output,
                images=rules.prepare_captions.output.images,
                info=rules.prepare_captions.output.info,
            )
            if SHARDS == 1
            else dict(shards=expand(rules.features_shard.output[0], shard=range(SHARDS), allow_missing=True))
        ),
    output:
        f"{WORK}/features/{{enc}}.h5",
    params:
        cli=CAPTIONING,
        **(
            dict(
                prep=lambda wc, input: os.path.dirname(input.info),
                batch_size=config["extract"]["batch_size"],
                device=config["device"],
            )
            if SHARDS == 1
            else {}
        ),
    log:
        f"logs/features/{DS}-{{enc}}.log",
    benchmark:
        f"logs/benchmarks/features/{DS}-{{enc}}.tsv"
    conda:
        "../envs/captioning.yaml"
    threads: 2
    resources:
        mem_mb=job("features", "mem_mb"),
        runtime=job("features", "runtime"),
        gpu=GPU if SHARDS == 1 else 0,  # merging is copying
    shell:
        (
            "{params.cli} extract --encoder {input.encoder} --prepared {params.prep} --out {output}"
            " --batch-size {params.batch_size} --device {params.device} > {log} 2>&1"
        )
        if SHARDS == 1
        else "{params.cli} merge-features --out {output} {input.shards} > {log} 2>&1"
