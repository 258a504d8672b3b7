# Artifacts: every variant becomes one deployable .capz file (encoder + decoder + vocabulary),
# and that file is what gets evaluated, so size_mb is a real size on disk.


rule pack:
    message:
        "Packing variant {wildcards.enc}-{wildcards.dec}-{wildcards.dstage}-{wildcards.quant}"
    input:
        encoder=rules.encoder_weights.output,
        decoder=f"{WORK}/decoders/{{enc}}/{{dec}}/{{dstage}}.safetensors",
        vocab=rules.prepare_captions.output.vocab,
        info=rules.prepare_captions.output.info,
    output:
        f"{WORK}/artifacts/{{enc}}-{{dec}}-{{dstage}}-{{quant}}.capz",
    params:
        cli=CAPTIONING,
        meta=variant_meta,
        prep=lambda wc, input: os.path.dirname(input.info),
    log:
        f"logs/pack/{DS}-{{enc}}-{{dec}}-{{dstage}}-{{quant}}.log",
    benchmark:
        f"logs/benchmarks/pack/{DS}-{{enc}}-{{dec}}-{{dstage}}-{{quant}}.tsv"
    conda:
        "../envs/captioning.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=20,
    shell:
        "{params.cli} pack --encoder {input.encoder} --decoder {input.decoder} --prepared {params.prep}"
        " --quantization {wildcards.quant} --meta {params.meta:q} --out {output} > {log} 2>&1"
