using System.Diagnostics;
using System.Text;
using System.Text.Json;
using System.Text.Json.Serialization;
using System.Threading.Channels;
using Akka.Actor;
using ActorVmm.Devices.Tracing;

namespace ActorVmm.Host.Tracing;

/// <summary>One traced message: its id and causal parent (0 = none), monotonic time since the
/// trace began, who sent it to whom, and the message.</summary>
public sealed record TraceEvent(long Id, long ParentId, long Nanoseconds, string Sender, string Receiver, object Message)
{
    public string Type => Message.GetType().Name;
}

/// <summary>What to keep: actors (by name, sender or receiver) and message types (by simple
/// name), empty = all; and one event in <see cref="SampleEvery"/>.</summary>
public sealed record TraceFilter(IReadOnlySet<string> Actors, IReadOnlySet<string> Types, int SampleEvery = 1)
{
    public static readonly TraceFilter All = new(new HashSet<string>(), new HashSet<string>());

    /// <summary>Parses "actor=uart0,actor=vcpu-0,type=Write,sample=10".</summary>
    public static TraceFilter Parse(string text)
    {
        var actors = new HashSet<string>(StringComparer.Ordinal);
        var types = new HashSet<string>(StringComparer.Ordinal);
        var sample = 1;
        foreach (var part in text.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries))
        {
            var kv = part.Split('=', 2, StringSplitOptions.TrimEntries);
            if (kv.Length != 2 || kv[1].Length == 0) throw new FormatException($"trace filter \"{part}\" is not key=value");
            switch (kv[0])
            {
                case "actor": actors.Add(kv[1]); break;
                case "type": types.Add(kv[1]); break;
                case "sample":
                    if (!int.TryParse(kv[1], out sample) || sample < 1) throw new FormatException($"trace filter sample={kv[1]} is not a positive number");
                    break;
                default: throw new FormatException($"trace filter key \"{kv[0]}\" is not actor, type or sample");
            }
        }
        return new TraceFilter(actors, types, sample);
    }

    public bool Matches(string sender, string receiver, string type) =>
        (Actors.Count == 0 || Actors.Contains(sender) || Actors.Contains(receiver)) && (Types.Count == 0 || Types.Contains(type));
}

/// <summary>
/// Records the messages among a VM's actors: keeps the latest <see cref="Capacity"/> in a ring
/// (for the sequence view, the Perfetto export and tests) and, if given a path, writes every one as
/// a JSON line {"id", "parent", "t_ns", "sender", "receiver", "type", "msg"} from a background
/// writer. Record() runs on the sender's thread and only enqueues. A filter keeps some actors or
/// types only, and sampling one event in N.
/// </summary>
public sealed class TraceRecorder : ITraceSink, IAsyncDisposable
{
    public int Capacity { get; }

    private readonly long _start = Stopwatch.GetTimestamp();
    private readonly TraceEvent?[] _ring;
    private long _count;
    private readonly object _ringGate = new();
    private readonly Channel<TraceEvent>? _channel;
    private readonly Task? _writer;

    public static readonly JsonSerializerOptions JsonOptions = new()
    {
        Converters = { new ActorRefConverter(), new JsonStringEnumConverter(), new NotDataConverter() },
        NumberHandling = JsonNumberHandling.Strict,
    };

    private readonly TraceFilter _filter;
    private long _seen;

    /// <param name="jsonLinesPath">stream every kept event to this file as JSON lines</param>
    /// <param name="capacity">the ring's bound: the latest events kept in memory</param>
    /// <param name="filter">which events are kept; null: all</param>
    public TraceRecorder(string? jsonLinesPath = null, int capacity = 100_000, TraceFilter? filter = null)
    {
        if (capacity < 1) throw new ArgumentOutOfRangeException(nameof(capacity));
        Capacity = capacity;
        _ring = new TraceEvent?[capacity];
        _filter = filter ?? TraceFilter.All;
        if (jsonLinesPath is null) return;
        var stream = new FileStream(jsonLinesPath, FileMode.Create, FileAccess.Write, FileShare.Read);
        // Bounded: a guest that sends faster than the file takes lines waits for the writer (the
        // file keeps every event), rather than growing the host's memory. The writer has a thread of
        // its own, so waiting senders cannot starve it.
        _channel = Channel.CreateBounded<TraceEvent>(new BoundedChannelOptions(FileBacklog)
            { SingleReader = true, FullMode = BoundedChannelFullMode.Wait });
        _writer = Task.Factory.StartNew(() => WriteLines(stream, _channel.Reader), CancellationToken.None,
            TaskCreationOptions.LongRunning, TaskScheduler.Default);
    }

    /// <summary>Events waiting for the JSON-lines file at most.</summary>
    public const int FileBacklog = 65_536;

    private volatile Exception? _writeFailure;
    private long _lost;

    /// <summary>Events not written to the file because writing it failed (see <see cref="WriteFailure"/>).</summary>
    public long Lost => Interlocked.Read(ref _lost);

    /// <summary>Why the JSON-lines file stopped, if it did (disk full, ...); the ring goes on.</summary>
    public Exception? WriteFailure => _writeFailure;

    public long Count => Interlocked.Read(ref _count);

    /// <summary>Called with every kept event, on the sender's thread (a live tail: it must only
    /// enqueue). Null when nobody follows the trace.</summary>
    public volatile Action<TraceEvent>? Live;

    /// <summary>Records with a fresh id and no parent (messages from outside the actors, tests).</summary>
    public void Record(IActorRef? sender, IActorRef receiver, object message) =>
        Record(TraceContext.NextId(), 0, sender, receiver, message);

    public void Record(long id, long parentId, IActorRef? sender, IActorRef receiver, object message)
    {
        var from = Name(sender);
        var to = Name(receiver);
        var type = message.GetType().Name;
        if (!_filter.Matches(from, to, type)) return;
        if (_filter.SampleEvery > 1 && Interlocked.Increment(ref _seen) % _filter.SampleEvery != 1) return;
        var e = new TraceEvent(id, parentId, (long)Stopwatch.GetElapsedTime(_start).TotalNanoseconds, from, to, message);
        lock (_ringGate)
        {
            _ring[_count % Capacity] = e;
            _count++;
        }
        if (_channel is not null) ToFile(e);
        Live?.Invoke(e);
    }

    /// <summary>The trace time (<see cref="TraceEvent.Nanoseconds"/>) of a Stopwatch timestamp taken
    /// elsewhere in this process: lines up an outside event with the messages.</summary>
    public long Nanoseconds(long stopwatchTimestamp) => (long)Stopwatch.GetElapsedTime(_start, stopwatchTimestamp).TotalNanoseconds;

    /// <summary>The recorded events still in the ring, oldest first.</summary>
    public IReadOnlyList<TraceEvent> Snapshot()
    {
        lock (_ringGate)
        {
            var n = (int)Math.Min(_count, Capacity);
            var result = new List<TraceEvent>(n);
            for (var i = _count - n; i < _count; i++) result.Add(_ring[i % Capacity]!);
            return result;
        }
    }

    /// <summary>Actor names by reference: a VM has few actors and each sends many messages. Bounded,
    /// because short-lived actors (asks, temporary followers) would otherwise pile up.</summary>
    private readonly System.Collections.Concurrent.ConcurrentDictionary<IActorRef, string> _names = new();
    private const int MaxCachedNames = 4096;

    private string Name(IActorRef? actor)
    {
        if (actor is null) return "(none)";
        if (_names.TryGetValue(actor, out var name)) return name;
        name = ComputeName(actor);
        if (_names.Count < MaxCachedNames) _names.TryAdd(actor, name);
        return name;
    }

    /// <summary>
    /// /user/vm-demo/vcpu-0 → vcpu-0; /user/vm-demo → vm-demo; a device another node hosts for the VM
    /// (/user/vmm/device-.../uart0) → uart0; temp and system actors keep their path. An actor of another
    /// process (its address has a host) gets "@HOST:PORT": uart0@127.0.0.1:4712.
    /// </summary>
    internal static string ComputeName(IActorRef actor)
    {
        if (actor.IsNobody()) return "(none)";
        var elements = actor.Path.Elements;
        string name;
        if (elements.Count >= 4 && elements[0] == "user" && elements[1] == Control.ControlProtocol.DirectoryName
            && elements[2].StartsWith(Cluster.RemoteDevices.HostedPrefix, StringComparison.Ordinal))
            name = string.Join('/', elements.Skip(3));
        else if (elements.Count >= 3 && elements[0] == "user") name = string.Join('/', elements.Skip(2));
        else if (elements.Count == 2 && elements[0] == "user") name = elements[1];
        else name = "/" + string.Join('/', elements);
        var address = actor.Path.Address;
        return address.Host is { } host ? $"{name}@{host}:{address.Port}" : name;
    }

    public static string ToJsonLine(TraceEvent e)
    {
        string msg;
        try { msg = JsonSerializer.Serialize(e.Message, e.Message.GetType(), JsonOptions); }
        catch (Exception ex) when (ex is NotSupportedException or JsonException or InvalidOperationException)
        {
            msg = JsonSerializer.Serialize(new { unserializable = e.Message.ToString() });
        }
        var sb = new StringBuilder(128 + msg.Length);
        sb.Append("{\"id\":").Append(e.Id).Append(",\"parent\":").Append(e.ParentId)
          .Append(",\"t_ns\":").Append(e.Nanoseconds)
          .Append(",\"sender\":").Append(JsonSerializer.Serialize(e.Sender))
          .Append(",\"receiver\":").Append(JsonSerializer.Serialize(e.Receiver))
          .Append(",\"type\":").Append(JsonSerializer.Serialize(e.Type))
          .Append(",\"msg\":").Append(msg).Append('}');
        return sb.ToString();
    }

    /// <summary>How many events of each kind (sender, receiver, message type), most frequent first.</summary>
    public static IEnumerable<(string Sender, string Receiver, string Type, int Count)> CountByKind(IEnumerable<TraceEvent> events) =>
        events.GroupBy(e => (e.Sender, e.Receiver, e.Type))
            .Select(g => (g.Key.Sender, g.Key.Receiver, g.Key.Type, Count: g.Count()))
            .OrderByDescending(k => k.Count);

    /// <summary>A line for people: "  12.345 ms  #12 &lt;- #10  vcpu-0 -&gt; uart0  Write { Offset = 0, ... }".</summary>
    public static string ToText(TraceEvent e) =>
        $"{e.Nanoseconds / 1e6,10:F3} ms  #{e.Id,-6} {(e.ParentId == 0 ? "" : "<- #" + e.ParentId),-10} {e.Sender,-14} -> {e.Receiver,-14} {e.Message}";

    private void ToFile(TraceEvent e)
    {
        if (_channel!.Writer.TryWrite(e)) return;
        if (_writeFailure is not null)
        {
            Interlocked.Increment(ref _lost);
            return;
        }
        // The backlog is full: wait for the writer (or for it to fail, or for the end).
        try
        {
            if (!_channel.Writer.WriteAsync(e).AsTask().Wait(TimeSpan.FromSeconds(30))) Interlocked.Increment(ref _lost);
        }
        catch (AggregateException)
        {
            Interlocked.Increment(ref _lost); // completed: the recorder is being disposed
        }
    }

    private void WriteLines(Stream stream, ChannelReader<TraceEvent> reader)
    {
        try
        {
            using var writer = new StreamWriter(stream, new UTF8Encoding(false));
            while (reader.WaitToReadAsync().AsTask().GetAwaiter().GetResult())
                while (reader.TryRead(out var e)) writer.WriteLine(ToJsonLine(e));
        }
        catch (Exception ex) when (ex is IOException or UnauthorizedAccessException)
        {
            _writeFailure = ex;
            while (reader.TryRead(out _)) Interlocked.Increment(ref _lost); // unblock waiting senders
        }
    }

    public async ValueTask DisposeAsync()
    {
        if (_channel is null) return;
        _channel.Writer.TryComplete();
        await _writer!;
    }

    /// <summary>Tasks and task sources in a message are not data: their properties would wait for a
    /// result (Task.Result) and hold up the trace writer. Written as their type name.</summary>
    private sealed class NotDataConverter : JsonConverterFactory
    {
        public override bool CanConvert(Type t) =>
            typeof(Task).IsAssignableFrom(t) || (t.IsGenericType && t.GetGenericTypeDefinition() == typeof(TaskCompletionSource<>)) ||
            t == typeof(TaskCompletionSource) || typeof(CancellationTokenSource).IsAssignableFrom(t);

        public override JsonConverter CreateConverter(Type t, JsonSerializerOptions options) =>
            (JsonConverter)Activator.CreateInstance(typeof(NameOnly<>).MakeGenericType(t))!;

        private sealed class NameOnly<T> : JsonConverter<T>
        {
            public override T Read(ref Utf8JsonReader reader, Type typeToConvert, JsonSerializerOptions options) =>
                throw new NotSupportedException("written, not read");

            public override void Write(Utf8JsonWriter writer, T value, JsonSerializerOptions options) =>
                writer.WriteStringValue($"<{typeof(T).Name}>");
        }
    }

    private sealed class ActorRefConverter : JsonConverter<IActorRef>
    {
        public override bool CanConvert(Type typeToConvert) => typeof(IActorRef).IsAssignableFrom(typeToConvert);
        public override IActorRef Read(ref Utf8JsonReader reader, Type typeToConvert, JsonSerializerOptions options) =>
            throw new NotSupportedException("actor references are written, not read");
        public override void Write(Utf8JsonWriter writer, IActorRef value, JsonSerializerOptions options) =>
            writer.WriteStringValue(value.Path.ToStringWithoutAddress());
    }
}
