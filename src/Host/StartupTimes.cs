using System.Diagnostics;
using System.Globalization;

namespace ActorVmm.Host;

/// <summary>
/// Start-up milestones of the host process (main, configuration read, actor system up, VM built,
/// first guest output, guest ended, actor system stopped), written to stderr as one line at exit
/// when ACTORVMM_STARTUP_TIMES is set. Times are milliseconds since the instant the variable holds,
/// a CLOCK_MONOTONIC reading in nanoseconds (what a launcher's Stopwatch.GetTimestamp() returns on
/// Linux, taken just before it starts the process), or since main when it holds anything else.
/// </summary>
public static class StartupTimes
{
    public const string Variable = "ACTORVMM_STARTUP_TIMES";

    private static readonly long? Origin = ReadOrigin();
    private static readonly List<(string Name, long At)> Marks = [];

    public static bool Enabled => Origin is not null;

    private static long? ReadOrigin()
    {
        var text = Environment.GetEnvironmentVariable(Variable);
        if (string.IsNullOrEmpty(text)) return null;
        return text[0] == '@' && long.TryParse(text.AsSpan(1), NumberStyles.None, CultureInfo.InvariantCulture, out var at)
            ? at : Stopwatch.GetTimestamp();
    }

    /// <summary>Records <paramref name="name"/> now, once (later marks of the same name are ignored).</summary>
    public static void Mark(string name)
    {
        if (Origin is null) return;
        var now = Stopwatch.GetTimestamp();
        lock (Marks)
            if (!Marks.Exists(m => m.Name == name)) Marks.Add((name, now));
    }

    /// <summary>"actorvmm: startup: main 41.2 ms, config 60.3 ms, ...", or nothing when disabled.</summary>
    public static void Write(TextWriter writer)
    {
        if (Origin is not { } origin) return;
        string line;
        lock (Marks)
            line = string.Join(", ", Marks.Select(m =>
                $"{m.Name} {(m.At - origin) * 1000.0 / Stopwatch.Frequency:F1} ms".Replace(',', '.')));
        writer.WriteLine($"actorvmm: startup: {line}");
    }
}
