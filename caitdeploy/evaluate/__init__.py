"""`caitdeploy eval`'s engine: the images (`data`), the artifacts opened into runners of the runtime layer
(`artifacts`), the measurement (`run.measure`), the numbers (`metrics`, pure functions) and the reports
(`report`). `caitdeploy.pipelines.eval` checks the options and drives it."""
