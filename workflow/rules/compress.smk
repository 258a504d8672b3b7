# Compression of the decoder: magnitude pruning to one ratio, then fine-tuning with the mask fixed.
# (Quantization happens when a variant is packed: see package.smk.)


rule prune_finetune:
    message:
        "Pruning decoder {wildcards.dec} on encoder {wildcards.enc} to {wildcards.ratio} ({wildcards.method}) and fine-tuning"
    input:
        decoder=f"{WORK}/decoders/{{enc}}/{{dec}}/{{train}}.safetensors",
        features=rules.features.output,
        labels=rules.prepare_captions.output.labels,
        refs=rules.prepare_captions.output.refs_val,
        info=rules.prepare_captions.output.info,
        teacher=prune_teacher,
    output:
        f"{WORK}/decoders/{{enc}}/{{dec}}/{{train}}_{{method}}{{ratio}}.safetensors",
    params:
        cli=CAPTIONING,
        finetune=as_json({**config["compress"]["prune"]["finetune"], **gpu_opts()}),
        teacher=teacher_arg,
        prep=lambda wc, input: os.path.dirname(input.info),
        seed=config["seed"],
        device=config["device"],
    log:
        f"logs/prune_finetune/{DS}-{{enc}}-{{dec}}-{{train}}_{{method}}{{ratio}}.log",
    benchmark:
        f"logs/benchmarks/prune_finetune/{DS}-{{enc}}-{{dec}}-{{train}}_{{method}}{{ratio}}.tsv"
    conda:
        "../envs/captioning.yaml"
    priority: 1
    threads: config["train"]["threads"]
    resources:
        mem_mb=job("prune_finetune", "mem_mb"),
        runtime=job("prune_finetune", "runtime"),
        gpu=GPU,
    shell:
        "{params.cli} prune --decoder {input.decoder} --features {input.features} --prepared {params.prep}"
        " --method {wildcards.method} --ratio {wildcards.ratio} --finetune {params.finetune:q}"
        " --seed {params.seed} --threads {threads} --device {params.device}{params.teacher} --out {output}"
        " --log-json {log}.json > {log} 2>&1"


# Training noise (config seeds): the dense control of a seeded decoder (a reference or an architecture
# change) trained under seed + k.
use rule prune_finetune as prune_finetune_seed with:
    message:
        "Fine-tuning the dense control of decoder {wildcards.dec} on encoder {wildcards.enc} (seed + {wildcards.k})"
    input:
        **{**dict(rules.prune_finetune.input.items()),
           "decoder": f"{WORK}/decoders/{{enc}}/{{dec}}/{{train}}_seed{{k}}.safetensors"},
    output:
        f"{WORK}/decoders/{{enc}}/{{dec}}/{{train}}_{{method}}{{ratio}}_seed{{k}}.safetensors",
    params:
        seed=lambda wc: config["seed"] + int(wc.k),
    log:
        f"logs/prune_finetune/{DS}-{{enc}}-{{dec}}-{{train}}_{{method}}{{ratio}}_seed{{k}}.log",
    benchmark:
        f"logs/benchmarks/prune_finetune/{DS}-{{enc}}-{{dec}}-{{train}}_{{method}}{{ratio}}_seed{{k}}.tsv"
