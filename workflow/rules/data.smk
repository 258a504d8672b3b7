# Datasets: generate the synthetic one, then prepare any Karpathy-format dataset.


rule synthetic_dataset:
    message:
        "Generating the synthetic captioning dataset {DS}"
    output:
        json=f"{DATA}/dataset_synth.json",
        objects=f"{DATA}/objects.json",
        images=directory(f"{DATA}/images"),
    params:
        cli=CAPTIONING,
        out=lambda wc, output: os.path.dirname(output.json),
        s=config["dataset"]["synthetic"],
        seed=config["seed"],
    log:
        f"logs/synthetic_dataset/{DS}.log",
    benchmark:
        f"logs/benchmarks/synthetic_dataset/{DS}.tsv"
    conda:
        "../envs/captioning.yaml"
    threads: 1
    resources:
        mem_mb=job("synthetic_dataset", "mem_mb"),
        runtime=job("synthetic_dataset", "runtime"),
    shell:
        "{params.cli} synth --out {params.out} --n-train {params.s[n_train]} --n-val {params.s[n_val]}"
        " --n-test {params.s[n_test]} --img-size {params.s[img_size]} --seed {params.seed} > {log} 2>&1"


rule prepare_captions:
    message:
        "Preparing vocabulary, labels and references of {DS}"
    input:
        json=dataset_json(),
    output:
        vocab=f"{PREP}/vocab.json",
        labels=f"{PREP}/labels.h5",
        images=f"{PREP}/images.json",
        info=f"{PREP}/info.json",
        refs_val=f"{PREP}/refs_val.json",
        refs_test=f"{PREP}/refs_test.json",
    params:
        cli=CAPTIONING,
        root=image_root(),
        out=lambda wc, output: os.path.dirname(output.vocab),
        threshold=config["dataset"]["word_count_threshold"],
        max_length=config["dataset"]["max_length"],
    log:
        f"logs/prepare_captions/{DS}.log",
    benchmark:
        f"logs/benchmarks/prepare_captions/{DS}.tsv"
    conda:
        "../envs/captioning.yaml"
    threads: 1
    resources:
        mem_mb=job("prepare_captions", "mem_mb"),
        runtime=job("prepare_captions", "runtime"),
    shell:
        "{params.cli} prepare --dataset-json {input.json} --image-root {params.root} --out {params.out}"
        " --word-count-threshold {params.threshold} --max-length {params.max_length} > {log} 2>&1"
