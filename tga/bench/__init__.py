"""tga/bench

`tga evaluate bench`: the published multimodal safety benchmarks read from their own released files (one reader
module per benchmark, registered in `readers`), answered through one function (`answer.answer_requests`), judged by
the field's judges (`keywords` for the refusal-keyword lists, `guards` for Llama Guard 3, Llama Guard 3 Vision and
MD-Judge), resumably run by `runner`, and summarised by `metrics` and `report`.
"""
