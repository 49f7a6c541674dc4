"""The report: its content from the pipeline's outputs, the filter pictures, Markdown and HTML."""
