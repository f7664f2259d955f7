#!/bin/sh
# A llama-server stand-in for benchmarks: nginx answering fixed bodies, far faster than
# Corral, so that a benchmark through Corral measures Corral and not the upstream.
#
# Takes llama-server's command line; reads --host, --port and --parallel (all else is
# ignored), writes an nginx.conf into a fresh directory under $TMPDIR, then execs nginx
# in the foreground as a single process (no master/worker pair), so the process Corral
# started *is* nginx and a SIGTERM to it or its process group stops it (fast shutdown).
#
# Routes:
#   GET  /health                 {"status":"ok"}
#   GET  /props, /slots, /v1/models   fixed, llama-server-shaped
#   POST /v1/chat/completions    a fixed chat.completion (non-streaming)
#   POST /v1/chat/completions?stream=1   a fixed SSE stream of chat.completion.chunk
#   POST /v1/completions         a fixed SSE stream of text_completion chunks, always
# nginx cannot branch on the request body, so "stream": true in the body cannot pick the
# answer: a benchmark asks for a stream either with ?stream=1 or on /v1/completions
# (which streams whatever the body says). Ten content chunks, then [DONE].
#
# The config directory is not removed (exec leaves nobody to remove it): point TMPDIR at
# a directory you delete afterwards; the benchmark does, through [llama_server] env.
set -eu

host=127.0.0.1
port=8080
parallel=4
while [ $# -gt 0 ]; do
    case "$1" in
        --host) host=$2; shift 2 ;;
        --host=*) host=${1#*=}; shift ;;
        --port) port=$2; shift 2 ;;
        --port=*) port=${1#*=}; shift ;;
        -np|--parallel) parallel=$2; shift 2 ;;
        --parallel=*) parallel=${1#*=}; shift ;;
        *) shift ;;
    esac
done

nginx_bin=$(command -v nginx || true)
[ -n "$nginx_bin" ] || [ ! -x /usr/sbin/nginx ] || nginx_bin=/usr/sbin/nginx
if [ -z "$nginx_bin" ]; then
    echo "nginx_upstream: nginx not found; install it: apt-get install -y nginx" >&2
    exit 1
fi

dir=$(mktemp -d "${TMPDIR:-/tmp}/corral-nginx-upstream.XXXXXX")

created=1700000000
chat_json='{"id":"chatcmpl-bench","object":"chat.completion","created":'$created',"model":"bench","system_fingerprint":"b6000-nginx","choices":[{"index":0,"message":{"role":"assistant","content":"one two three four five six seven eight"},"finish_reason":"length"}],"usage":{"completion_tokens":8,"prompt_tokens":10,"total_tokens":18},"timings":{"cache_n":0,"prompt_n":10,"prompt_ms":1.0,"predicted_n":8,"predicted_ms":1.0,"predicted_per_second":8000.0}}'

# SSE bodies. nginx turns \n inside a quoted string into a newline.
chunk_head='{"id":"chatcmpl-bench","object":"chat.completion.chunk","created":'$created',"model":"bench","system_fingerprint":"b6000-nginx","choices":[{"index":0,"finish_reason":'
chat_sse="data: ${chunk_head}null,\"delta\":{\"role\":\"assistant\",\"content\":null}}]}\\n\\n"
text_head='{"id":"cmpl-bench","object":"text_completion","created":'$created',"model":"bench","system_fingerprint":"b6000-nginx","choices":[{"index":0,"logprobs":null,"finish_reason":'
text_sse=""
for word in one two three four five six seven eight nine ten; do
    chat_sse="${chat_sse}data: ${chunk_head}null,\"delta\":{\"content\":\" ${word}\"}}]}\\n\\n"
    text_sse="${text_sse}data: ${text_head}null,\"text\":\" ${word}\"}]}\\n\\n"
done
timings='"timings":{"prompt_n":10,"prompt_ms":1.0,"predicted_n":10,"predicted_ms":1.0}'
chat_sse="${chat_sse}data: ${chunk_head}\"length\",\"delta\":{}}],${timings}}\\n\\ndata: [DONE]\\n\\n"
text_sse="${text_sse}data: ${text_head}\"length\",\"text\":\"\"}],${timings}}\\n\\ndata: [DONE]\\n\\n"

props_json='{"default_generation_settings":{"id":0,"id_task":-1,"n_ctx":4096,"is_processing":false},"total_slots":'$parallel',"model_path":"bench.gguf","build_info":"b6000-nginx"}'
models_json='{"object":"list","data":[{"id":"bench","object":"model","created":'$created',"owned_by":"llamacpp"}]}'
slots_json='[{"id":0,"id_task":-1,"n_ctx":4096,"is_processing":false}]'

# The bodies hold double quotes and no single quote or "$": single-quoted nginx strings
# take them verbatim (nginx expands $ in return text).
cat > "$dir/nginx.conf" <<EOF
# Written by tests/fakes/nginx_upstream.sh. One process, no master: Corral gives its
# child PR_SET_PDEATHSIG, and an nginx worker whose master is SIGKILLed lives on, still
# serving (seen with nginx 1.22). A lone process dies with Corral. One core is plenty.
worker_processes 1;
master_process off;
error_log stderr warn;
pid $dir/nginx.pid;

events {
    worker_connections 4096;
}

http {
    access_log off;
    client_body_temp_path $dir/client_body;
    proxy_temp_path $dir/proxy;
    fastcgi_temp_path $dir/fastcgi;
    uwsgi_temp_path $dir/uwsgi;
    scgi_temp_path $dir/scgi;
    # Bodies of a benchmark are small; keep them in memory, never in temp files.
    client_body_buffer_size 64k;
    keepalive_requests 100000;
    keepalive_timeout 75s;
    tcp_nodelay on;
    server_tokens off;

    server {
        listen $host:$port backlog=4096;
        default_type application/json;

        location = /health { return 200 '{"status":"ok"}'; }
        location = /props { return 200 '$props_json'; }
        location = /slots { return 200 '$slots_json'; }
        location = /v1/models { return 200 '$models_json'; }

        location = /v1/chat/completions {
            if (\$arg_stream) {
                rewrite ^ /sse/chat last;
            }
            return 200 '$chat_json';
        }
        location = /v1/completions {
            rewrite ^ /sse/text last;
        }
        location = /sse/chat {
            internal;
            default_type text/event-stream;
            return 200 '$chat_sse';
        }
        location = /sse/text {
            internal;
            default_type text/event-stream;
            return 200 '$text_sse';
        }
        location / {
            return 404 '{"error":{"code":404,"message":"File Not Found","type":"not_found_error"}}';
        }
    }
}
EOF

echo "nginx_upstream: listening on http://$host:$port (config $dir/nginx.conf)" >&2
# -e: without it nginx first opens its compiled-in error log (/var/log/nginx), which a
# non-root user cannot. daemon off is given here, not in the file, as nginx refuses both.
exec "$nginx_bin" -e stderr -p "$dir" -c "$dir/nginx.conf" -g 'daemon off;'
