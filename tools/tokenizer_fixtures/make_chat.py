"""Chat-template fixtures: real chat templates from public tokenizer_config.json files (kept here
as their JSON-escaped text), rendered for a few conversations with jinja2 configured exactly as
transformers' apply_chat_template configures it (ImmutableSandboxedEnvironment, trim_blocks,
lstrip_blocks, loopcontrols, raise_exception, json.dumps-based tojson, strftime_now), with
strftime_now pinned to a fixed UTC time. Where transformers is installed, every render that
does not depend on the clock is also checked against transformers' own render_jinja_template.

Run from the repository root: python3 tools/tokenizer_fixtures/make_chat.py
"""
import json
from datetime import datetime, timezone

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

OUT = "crates/flowgate-engine/tests/data/chat"
NOW_UNIX = 1721952000 + 3 * 3600 + 25 * 60 + 7  # 2024-07-26 03:25:07 UTC

# JSON-escaped template text as found in tokenizer_config.json ("chat_template").
TEMPLATES_JSON = {
    # meta-llama/Meta-Llama-3-8B-Instruct
    "llama3": (
        r"""{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}""",
        "<|begin_of_text|>",
        "<|eot_id|>",
    ),
    # Qwen/Qwen2.5-*-Instruct (ChatML with a default system message)
    "qwen2.5": (
        r"""{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0]['role'] == 'system' %}\n        {{- messages[0]['content'] }}\n    {%- else %}\n        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n    {%- endif %}\n    {{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n    {%- for tool in tools %}\n        {{- \"\\n\" }}\n        {{- tool | tojson }}\n    {%- endfor %}\n    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": <args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n{%- else %}\n    {%- if messages[0]['role'] == 'system' %}\n        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n    {%- else %}\n        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}\n    {%- endif %}\n{%- endif %}\n{%- for message in messages %}\n    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or (message.role == \"assistant\" and not message.tool_calls) %}\n        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n    {%- elif message.role == \"assistant\" %}\n        {{- '<|im_start|>' + message.role }}\n        {%- if message.content %}\n            {{- '\\n' + message.content }}\n        {%- endif %}\n        {%- for tool_call in message.tool_calls %}\n            {%- if tool_call.function is defined %}\n                {%- set tool_call = tool_call.function %}\n            {%- endif %}\n            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n            {{- tool_call.name }}\n            {{- '\", \"arguments\": ' }}\n            {{- tool_call.arguments | tojson }}\n            {{- '}\\n</tool_call>' }}\n        {%- endfor %}\n        {{- '<|im_end|>\\n' }}\n    {%- elif message.role == \"tool\" %}\n        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != \"tool\") %}\n            {{- '<|im_start|>user' }}\n        {%- endif %}\n        {{- '\\n<tool_response>\\n' }}\n        {{- message.content }}\n        {{- '\\n</tool_response>' }}\n        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n            {{- '<|im_end|>\\n' }}\n        {%- endif %}\n    {%- endif %}\n{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n""",
        "",
        "<|im_end|>",
    ),
    # mistralai/Mistral-7B-Instruct-v0.2 (mistral "v1" template with system prompt support)
    "mistral": (
        r"""{%- if messages[0]['role'] == 'system' %}\n    {%- set system_message = messages[0]['content'] %}\n    {%- set loop_messages = messages[1:] %}\n{%- else %}\n    {%- set loop_messages = messages %}\n{%- endif %}\n\n{{- bos_token }}\n{%- for message in loop_messages %}\n    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\n        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}\n    {%- endif %}\n    {%- if message['role'] == 'user' %}\n        {%- if loop.first and system_message is defined %}\n            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}\n        {%- else %}\n            {{- ' [INST] ' + message['content'] + ' [/INST]' }}\n        {%- endif %}\n    {%- elif message['role'] == 'assistant' %}\n        {{- ' ' + message['content'] + eos_token}}\n    {%- else %}\n        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}\n    {%- endif %}\n{%- endfor %}\n""",
        "<s>",
        "</s>",
    ),
    # Qwen/Qwen3-* (thinking template)
    "qwen3": (
        r"""{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0].role == 'system' %}\n        {{- messages[0].content + '\\n\\n' }}\n    {%- endif %}\n    {{- \"# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n    {%- for tool in tools %}\n        {{- \"\\n\" }}\n        {{- tool | tojson }}\n    {%- endfor %}\n    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": <args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n{%- else %}\n    {%- if messages[0].role == 'system' %}\n        {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}\n    {%- endif %}\n{%- endif %}\n{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}\n{%- for message in messages[::-1] %}\n    {%- set index = (messages|length - 1) - loop.index0 %}\n    {%- if ns.multi_step_tool and message.role == \"user\" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}\n        {%- set ns.multi_step_tool = false %}\n        {%- set ns.last_query_index = index %}\n    {%- endif %}\n{%- endfor %}\n{%- for message in messages %}\n    {%- if message.content is string %}\n        {%- set content = message.content %}\n    {%- else %}\n        {%- set content = '' %}\n    {%- endif %}\n    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) %}\n        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}\n    {%- elif message.role == \"assistant\" %}\n        {%- set reasoning_content = '' %}\n        {%- if message.reasoning_content is string %}\n            {%- set reasoning_content = message.reasoning_content %}\n        {%- else %}\n            {%- if '</think>' in content %}\n                {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}\n                {%- set content = content.split('</think>')[-1].lstrip('\\n') %}\n            {%- endif %}\n        {%- endif %}\n        {%- if loop.index0 > ns.last_query_index %}\n            {%- if loop.last or (not loop.last and reasoning_content) %}\n                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}\n            {%- else %}\n                {{- '<|im_start|>' + message.role + '\\n' + content }}\n            {%- endif %}\n        {%- else %}\n            {{- '<|im_start|>' + message.role + '\\n' + content }}\n        {%- endif %}\n        {%- if message.tool_calls %}\n            {%- for tool_call in message.tool_calls %}\n                {%- if (loop.first and content) or (not loop.first) %}\n                    {{- '\\n' }}\n                {%- endif %}\n                {%- if tool_call.function %}\n                    {%- set tool_call = tool_call.function %}\n                {%- endif %}\n                {{- '<tool_call>\\n{\"name\": \"' }}\n                {{- tool_call.name }}\n                {{- '\", \"arguments\": ' }}\n                {%- if tool_call.arguments is string %}\n                    {{- tool_call.arguments }}\n                {%- else %}\n                    {{- tool_call.arguments | tojson }}\n                {%- endif %}\n                {{- '}\\n</tool_call>' }}\n            {%- endfor %}\n        {%- endif %}\n        {{- '<|im_end|>\\n' }}\n    {%- elif message.role == \"tool\" %}\n        {%- if loop.first or (messages[loop.index0 - 1].role != \"tool\") %}\n            {{- '<|im_start|>user' }}\n        {%- endif %}\n        {{- '\\n<tool_response>\\n' }}\n        {{- content }}\n        {{- '\\n</tool_response>' }}\n        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n            {{- '<|im_end|>\\n' }}\n        {%- endif %}\n    {%- endif %}\n{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n    {%- if enable_thinking is defined and enable_thinking is false %}\n        {{- '<think>\\n\\n</think>\\n\\n' }}\n    {%- endif %}\n{%- endif %}""",
        "",
        "<|im_end|>",
    ),
}

# Small templates written here to pin the environment's features (not from a model).
FEATURE_TEMPLATES = {
    "feat_tojson": (
        "{{ messages | tojson }}\n{{ messages[0] | tojson(indent=2) }}\n"
        "{{ {'b': 1, 'a': [1, 2.5, none, true, false, -3], 'c': {'z': 'é\"\\\\\\n\\t'}} | tojson(sort_keys=true) }}\n"
        "{{ [1, 2] | tojson(separators=(',', ':')) }}|{{ {} | tojson }}|{{ [] | tojson(indent=4) }}|{{ 'x<y>&z' | tojson }}",
        "<s>",
        "</s>",
    ),
    "feat_pystr": (
        "{% for m in messages %}{{ m.content.strip() }}|{{ m.content.split() | join(',') }}|{{ m.role.upper() }}"
        "|{{ m.content.startswith('  ') }}|{{ m.content.replace('a', 'A') }}|{{ m.content.lstrip() }}|{{ m.content.rstrip('\\n ') }}"
        "|{{ m.role.title() }}|{{ m.content.endswith('!') }}\n{% endfor %}",
        "<s>",
        "</s>",
    ),
    "feat_blocks": (
        "{% set ns = namespace(n=0) %}\n"
        "{% for m in messages %}\n"
        "    {% if m.role == 'system' %}{% continue %}{% endif %}\n"
        "    {% set ns.n = ns.n + 1 %}\n"
        "  {{ loop.index }}:{{ m.role }}\n"
        "    {%- if loop.last %} (last){% endif %}\n"
        "\n"
        "{% endfor %}\n"
        "count={{ ns.n }} {{ messages|length }} {{ bos_token }}{{ eos_token }} {{ tools is none }} {{ undefined_var is defined }}\n"
        "{% if add_generation_prompt %}GEN{% endif %}\n",
        "<s>",
        "</s>",
    ),
    "feat_strftime": (
        "{{ strftime_now('%d %b %Y') }}|{{ strftime_now('%Y-%m-%d %H:%M:%S') }}|{{ strftime_now('%A %B %j %I%p %y %%') }}",
        "",
        "",
    ),
    "feat_raise": (
        "{% if messages|length > 1 %}{{ raise_exception('too many messages') }}{% endif %}ok",
        "",
        "",
    ),
}

CONVERSATIONS = [
    ("single", [{"role": "user", "content": "Hello!"}]),
    (
        "system_multi",
        [
            {"role": "system", "content": "You are a pirate."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Arr, hello!"},
            {"role": "user", "content": "Tell me a joke.\n  With spaces  "},
        ],
    ),
    (
        "no_system_multi",
        [
            {"role": "user", "content": "What's 2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "Thanks"},
        ],
    ),
    ("unicode", [{"role": "user", "content": "Ünïcödé 😀 中文 \"quotes\" and 'apostrophes' {{ not a tag }} <b>&amp;</b>"}]),
    (
        "thinking",
        [
            {"role": "user", "content": "Remember violet."},
            {"role": "assistant", "content": "<think>\nReason.\n</think>\n\nAnswer."},
            {"role": "user", "content": "And?"},
            {"role": "assistant", "content": "<think>More.</think>Done."},
        ],
    ),
    ("bad_order", [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]),
]


def strftime_now(fmt):
    return datetime.fromtimestamp(NOW_UNIX, tz=timezone.utc).strftime(fmt)


def make_env():
    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


def transformers_render(template, messages, add_gen, bos, eos):
    try:
        from transformers.utils.chat_template_utils import render_jinja_template
    except Exception:  # transformers not installed: skip the cross-check
        return None
    kwargs = {}
    if bos:
        kwargs["bos_token"] = bos
    if eos:
        kwargs["eos_token"] = eos
    try:
        out, _ = render_jinja_template(
            conversations=[messages], chat_template=template, add_generation_prompt=add_gen, **kwargs
        )
        return ("ok", out[0])
    except Exception as e:  # noqa: BLE001
        return ("error", str(e))


def main():
    env = make_env()
    templates = {}
    for name, (escaped, bos, eos) in TEMPLATES_JSON.items():
        templates[name] = {"source": json.loads('"' + escaped + '"'), "bos": bos, "eos": eos}
    for name, (src, bos, eos) in FEATURE_TEMPLATES.items():
        templates[name] = {"source": src, "bos": bos, "eos": eos}

    cases = []
    checked = 0
    for name, t in templates.items():
        tmpl = env.from_string(t["source"])
        for conv_name, messages in CONVERSATIONS:
            for add_gen in (True, False):
                ctx = dict(messages=messages, tools=None, documents=None, add_generation_prompt=add_gen)
                if t["bos"]:
                    ctx["bos_token"] = t["bos"]
                if t["eos"]:
                    ctx["eos_token"] = t["eos"]
                case = {"template": name, "conversation": conv_name, "add_generation_prompt": add_gen}
                try:
                    case["expected"] = tmpl.render(**ctx)
                except jinja2.exceptions.TemplateError as e:
                    case["error"] = str(e)
                if "strftime" not in t["source"]:
                    tr = transformers_render(t["source"], messages, add_gen, t["bos"], t["eos"])
                    if tr is not None:
                        if "error" in case:
                            assert tr[0] == "error", (name, conv_name, tr)
                        else:
                            assert tr == ("ok", case["expected"]), (name, conv_name, tr, case["expected"])
                        checked += 1
                cases.append(case)

    with open(f"{OUT}/templates.json", "w") as f:
        json.dump(templates, f, ensure_ascii=False, indent=1)
    with open(f"{OUT}/cases.json", "w") as f:
        json.dump(
            {"now_unix": NOW_UNIX, "conversations": dict(CONVERSATIONS), "cases": cases},
            f,
            ensure_ascii=False,
            indent=1,
        )
    print(f"{len(cases)} cases, {checked} cross-checked against transformers")


if __name__ == "__main__":
    main()
