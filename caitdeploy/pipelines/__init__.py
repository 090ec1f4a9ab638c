"""The commands as a library: each pipeline takes a dataclass of options and returns a result object, and each
`caitdeploy` command parses its flags into those options, calls one pipeline and prints the result.

    export   `ExportOptions` -> `export()` -> `ExportResult`: fused model -> ONNX [-> int8] [-> engine]
             [-> Triton repository], every output written together or none
    fuse     `FuseOptions` -> `fuse()` -> `FuseResult`: checkpoint -> fused model file and report
    inspect  path -> `inspect()` -> `InspectResult`: what a checkpoint, fused model, ONNX file or engine is
    convert  `ConvertOptions` -> `convert()` -> `ConvertResult`: SiT / LV-ViT / SPViT / DIMAP checkpoint -> fused
             model file and report
    bench    `BenchOptions` -> `bench()` -> `BenchResult`: fused model(s) vs dense and ToMe, measured; the records
             and the reports (JSON, Markdown, plot) written together or none
    common   what pipelines share: the JSON report writer, the dense-prediction option check, the notation
             rules of numeric option text

Import the modules (`from caitdeploy.pipelines.export import ExportOptions, export`): nothing heavy is imported
here, so `caitdeploy --help` stays fast."""
