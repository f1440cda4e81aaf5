using System.Collections.Concurrent;
using System.Diagnostics.Tracing;

namespace ActorVmm.Bench;

/// <summary>
/// Which types a run allocates, by the runtime's GC AllocationTick events (one about every 100 KB
/// allocated, naming the type that crossed the mark): a sample, so the bytes per type are an
/// estimate that gets better the longer the run. In process; no tool to install.
/// </summary>
internal sealed class AllocationSampler : EventListener
{
    private const EventKeywords GcKeyword = (EventKeywords)0x1;

    /// <summary>Bytes attributed to each type name so far.</summary>
    public ConcurrentDictionary<string, long> Bytes { get; } = new();

    protected override void OnEventSourceCreated(EventSource source)
    {
        if (source.Name == "Microsoft-Windows-DotNETRuntime") EnableEvents(source, EventLevel.Verbose, GcKeyword);
    }

    protected override void OnEventWritten(EventWrittenEventArgs e)
    {
        if (e.EventName is not ("GCAllocationTick_V4" or "GCAllocationTick_V3") || e.Payload is null || e.PayloadNames is null) return;
        var name = e.Payload[e.PayloadNames.IndexOf("TypeName")] as string ?? "?";
        var amount = Convert.ToInt64(e.Payload[e.PayloadNames.IndexOf("AllocationAmount")]);
        Bytes.AddOrUpdate(name, amount, (_, v) => v + amount);
    }
}
