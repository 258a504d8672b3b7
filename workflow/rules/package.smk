# Artifacts: every variant becomes one deployable .capz file (encoder + decoder + vocabulary),
# and that file is what gets evaluated, so size_mb is a real size on disk. The same job captions the
# raw test images with the file it wrote (one start-up for both); rule score scores them.


rule pack:
    message:
        "Packing and captioning variant {wildcards.enc}-{wildcards.dec}-{wildcards.dstage}-{wildcards.quant}"
    input:
        encoder=rules.encoder_weights.output,
        decoder=f"{WORK}/decoders/{{enc}}/{{dec}}/{{dstage}}.safetensors",
        vocab=rules.prepare_captions.output.vocab,
        info=rules.prepare_captions.output.info,
    output:
        model=f"{WORK}/artifacts/{{enc}}-{{dec}}-{{dstage}}-{{quant}}.capz",
        captions=f"{EVAL}/{{enc}}-{{dec}}-{{dstage}}-{{quant}}/captions.json",
        variant=f"{EVAL}/{{enc}}-{{dec}}-{{dstage}}-{{quant}}/variant.json",
    params:
        cli=CAPTIONING,
        meta=variant_meta,
        prep=lambda wc, input: os.path.dirname(input.info),
        out=lambda wc, output: os.path.dirname(output.captions),
        beam=config["evaluate"]["beam_size"],
        device=config["device"],
        mode=lambda wc: variant_of(wc).quantization,
        runtime=lambda wc: variant_of(wc).runtime,
        calibration=calibration_images,
        # variants with identical encoders (most of a family's) encode the test images once
        encoded=f"{WORK}/encoded",
    log:
        f"logs/pack/{DS}-{{enc}}-{{dec}}-{{dstage}}-{{quant}}.log",
    benchmark:
        f"logs/benchmarks/pack/{DS}-{{enc}}-{{dec}}-{{dstage}}-{{quant}}.tsv"
    conda:
        "../envs/captioning.yaml"
    threads: 1
    resources:
        mem_mb=job("pack", "mem_mb"),
        runtime=job("pack", "runtime"),
    shell:
        "{params.cli} pack --encoder {input.encoder} --decoder {input.decoder} --prepared {params.prep}"
        " --quantization {params.mode} --runtime {params.runtime} --calibration-images {params.calibration}"
        " --meta {params.meta:q} --out {output.model}"
        " --caption-dir {params.out} --encoder-cache {params.encoded} --beam-size {params.beam}"
        " --device {params.device} > {log} 2>&1"
