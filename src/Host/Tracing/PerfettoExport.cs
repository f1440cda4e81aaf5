using System.Text.Json;

namespace ActorVmm.Host.Tracing;

/// <summary>
/// Writes trace events in the Chrome Trace Event format, which the Perfetto UI (ui.perfetto.dev)
/// and chrome://tracing open: one track (thread) per actor — the receiver of each message — grouped
/// by node (a process per node: the VM's node first, then each node whose actors took part, named
/// "@HOST:PORT" in the trace), an instant event per message with its fields as args, and a flow arrow
/// from each message's causal parent to it.
/// </summary>
public static class PerfettoExport
{
    public static void Write(IReadOnlyList<TraceEvent> events, Stream output, string processName = "ActorVmm VM")
    {
        using var w = new Utf8JsonWriter(output, new JsonWriterOptions { Indented = false });
        var tracks = new Dictionary<string, int>(StringComparer.Ordinal);
        var nodes = new Dictionary<string, int>(StringComparer.Ordinal) { [""] = 1 };
        int Track(string actor)
        {
            if (!tracks.TryGetValue(actor, out var tid)) tracks[actor] = tid = tracks.Count + 1;
            return tid;
        }
        int Pid(string actor)
        {
            var node = NodeOf(actor);
            if (!nodes.TryGetValue(node, out var pid)) nodes[node] = pid = nodes.Count + 1;
            return pid;
        }
        foreach (var e in events)
        {
            Track(e.Receiver);
            Pid(e.Receiver);
        }
        var byId = new Dictionary<long, TraceEvent>();
        foreach (var e in events) byId[e.Id] = e;

        w.WriteStartObject();
        w.WriteString("displayTimeUnit", "ns");
        w.WriteStartArray("traceEvents");
        foreach (var (node, pid) in nodes) Metadata(w, "process_name", pid, 0, node.Length == 0 ? processName : $"{processName}: node {node}");
        foreach (var (actor, tid) in tracks) Metadata(w, "thread_name", Pid(actor), tid, actor);
        foreach (var e in events)
        {
            var ts = e.Nanoseconds / 1000.0;
            w.WriteStartObject();
            w.WriteString("name", e.Type);
            w.WriteString("cat", "message");
            w.WriteString("ph", "X");
            w.WriteNumber("ts", ts);
            w.WriteNumber("dur", 0.001);
            w.WriteNumber("pid", Pid(e.Receiver));
            w.WriteNumber("tid", Track(e.Receiver));
            w.WriteStartObject("args");
            w.WriteNumber("id", e.Id);
            w.WriteNumber("parent", e.ParentId);
            w.WriteString("from", e.Sender);
            w.WritePropertyName("msg");
            WriteMessage(w, e.Message);
            w.WriteEndObject();
            w.WriteEndObject();

            if (e.ParentId != 0 && byId.TryGetValue(e.ParentId, out var parent))
            {
                Flow(w, "s", e.Id, parent.Nanoseconds / 1000.0, Pid(parent.Receiver), Track(parent.Receiver));
                Flow(w, "f", e.Id, ts, Pid(e.Receiver), Track(e.Receiver));
            }
        }
        w.WriteEndArray();
        w.WriteEndObject();
    }

    private static void WriteMessage(Utf8JsonWriter w, object message)
    {
        try
        {
            JsonSerializer.Serialize(w, message, message.GetType(), TraceRecorder.JsonOptions);
        }
        catch (Exception e) when (e is NotSupportedException or JsonException or InvalidOperationException)
        {
            w.WriteStringValue(message.ToString());
        }
    }

    /// <summary>The node of a traced actor's name: what follows its '@' ("" for the VM's own node).</summary>
    public static string NodeOf(string actor)
    {
        var at = actor.LastIndexOf('@');
        return at < 0 ? "" : actor[(at + 1)..];
    }

    private static void Metadata(Utf8JsonWriter w, string name, int pid, int tid, string value)
    {
        w.WriteStartObject();
        w.WriteString("name", name);
        w.WriteString("ph", "M");
        w.WriteNumber("pid", pid);
        w.WriteNumber("tid", tid);
        w.WriteStartObject("args");
        w.WriteString("name", value);
        w.WriteEndObject();
        w.WriteEndObject();
    }

    private static void Flow(Utf8JsonWriter w, string phase, long id, double ts, int pid, int tid)
    {
        w.WriteStartObject();
        w.WriteString("name", "causes");
        w.WriteString("cat", "causality");
        w.WriteString("ph", phase);
        w.WriteNumber("id", id);
        w.WriteNumber("ts", ts);
        w.WriteNumber("pid", pid);
        w.WriteNumber("tid", tid);
        if (phase == "f") w.WriteString("bp", "e");
        w.WriteEndObject();
    }
}
