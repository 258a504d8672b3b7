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
        mem_mb=6000,
        runtime=120,
        gpu=lambda wc: GPU if encoder_cfg(wc).get("weights", "pretrain") == "pretrain" else 0,
    shell:
        "{params.cli} encoder --timm-name {params.cfg[timm_name]} --img-size {params.cfg[img_size]}"
        " --weights {params.cfg[weights]} {params.objects} --prepared {params.prep}"
        " --pretrain {params.pretrain:q} --seed {params.seed} --device {params.device}"
        " --out {output} --log-json {log}.json > {log} 2>&1"


rule features:
    message:
        "Extracting features of {DS} with encoder {wildcards.enc}"
    input:
        encoder=rules.encoder_weights.output,
        images=rules.prepare_captions.output.images,
        info=rules.prepare_captions.output.info,
    output:
        f"{WORK}/features/{{enc}}.h5",
    params:
        cli=CAPTIONING,
        prep=lambda wc, input: os.path.dirname(input.info),
        batch_size=config["extract"]["batch_size"],
        device=config["device"],
    log:
        f"logs/features/{DS}-{{enc}}.log",
    benchmark:
        f"logs/benchmarks/features/{DS}-{{enc}}.tsv"
    conda:
        "../envs/captioning.yaml"
    threads: 2
    resources:
        mem_mb=6000,
        runtime=60,
    shell:
        "{params.cli} extract --encoder {input.encoder} --prepared {params.prep} --out {output}"
        " --batch-size {params.batch_size} --device {params.device} > {log} 2>&1"
