using System.Diagnostics;
using System.Globalization;

namespace ActorVmm.Host;

/// <summary>
/// Where a host's start goes: milestones of `actorvmm run` and `demo`, written to stderr as one
/// line when the process is done, if ACTORVMM_STARTUP_TIMES is set:
/// <code>actorvmm: startup: main 52.1 ms, config 71.0 ms, vm prepared 80.3 ms, actor system 230.9 ms, ...</code>
/// main (the entry point is reached), config (command line, configuration and image read), vm
/// prepared (KVM opened, guest memory loaded, vcpus created: all a VM needs but its actors),
/// actor system (up, with the control endpoint), vm built (its actors created and told to start),
/// first instruction (a vcpu's first KVM_RUN), first output (the guest's first byte reached the serial console), guest ended (the host has the
/// outcome), stopped (the actor system terminated); in the order they came.
/// Times are milliseconds since the instant the variable gives as "@TICKS", a
/// <see cref="Stopwatch.GetTimestamp"/> reading of the process that started this one (the same
/// monotonic clock: the bench takes it just before the start), or since main for any other value.
/// </summary>
public static class StartupTimes
{
    public const string Variable = "ACTORVMM_STARTUP_TIMES";
    public const string LinePrefix = "actorvmm: startup: ";

    private static readonly long? Origin = ReadOrigin();
    private static readonly List<(string Name, long At)> Marks = [];

    private static long? ReadOrigin()
    {
        var text = Environment.GetEnvironmentVariable(Variable);
        if (string.IsNullOrEmpty(text)) return null;
        return text[0] == '@' && long.TryParse(text.AsSpan(1), NumberStyles.None, CultureInfo.InvariantCulture, out var at)
            ? at : Stopwatch.GetTimestamp();
    }

    /// <summary>Records <paramref name="name"/> now, the first time only. Thread-safe; nothing when disabled.</summary>
    public static void Mark(string name)
    {
        if (Origin is null) return;
        var now = Stopwatch.GetTimestamp();
        lock (Marks)
            if (!Marks.Exists(m => m.Name == name)) Marks.Add((name, now));
    }

    /// <summary>Records <paramref name="name"/> at <paramref name="timestamp"/> (a <see cref="Stopwatch.GetTimestamp"/>
    /// reading taken elsewhere), the first time only.</summary>
    public static void MarkAt(string name, long timestamp)
    {
        if (Origin is null) return;
        lock (Marks)
            if (!Marks.Exists(m => m.Name == name)) Marks.Add((name, timestamp));
    }

    /// <summary>Writes the milestones line to <paramref name="writer"/>; nothing when disabled.</summary>
    public static void Write(TextWriter writer)
    {
        if (Origin is not { } origin) return;
        string line;
        lock (Marks)
            line = string.Join(", ", Marks.OrderBy(m => m.At).Select(m =>
                string.Create(CultureInfo.InvariantCulture, $"{m.Name} {Stopwatch.GetElapsedTime(origin, m.At).TotalMilliseconds:F1} ms")));
        writer.WriteLine(LinePrefix + line);
    }
}
