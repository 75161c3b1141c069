"""sparsediff.pipelines"""
