using System.Globalization;
using ActorVmm.Host;
using ActorVmm.Testing;
using Xunit;
using static Iced.Intel.AssemblerRegisters;

namespace ActorVmm.Integration.Tests;

/// <summary>`actorvmm run` tells where its start went (ACTORVMM_STARTUP_TIMES), with a guest that writes 'A' to COM1 and debug-exits.</summary>
public sealed partial class CliGuestTests
{
    [KvmFact]
    public async Task Run_tells_where_its_start_went_from_main_to_the_guests_first_output_and_its_end()
    {
        KvmRequirement.Check();
        var guest = Flat(a =>
        {
            a.mov(dx, 0x3F8);
            a.mov(al, (byte)'A');
            a.@out(dx, al);
            a.mov(al, 0);
            a.@out(0xF4, al);
            a.cli();
            a.hlt();
        });
        var (code, stdout, stderr) = await Finish(Start(new Dictionary<string, string> { [StartupTimes.Variable] = "1" }, "run", "--flat", guest),
            TimeSpan.FromSeconds(300));
        Assert.True(code == 1, stderr);
        Assert.Equal("A", stdout);
        var line = stderr.Split('\n').Last(l => l.StartsWith(StartupTimes.LinePrefix, StringComparison.Ordinal));
        var at = line[StartupTimes.LinePrefix.Length..].Split(", ").Select(m => m.Split(' '))
            .ToDictionary(m => string.Join(' ', m[..^2]), m => double.Parse(m[^2], CultureInfo.InvariantCulture));
        // The VM is prepared beside the actor system's start; its actors come once both are done.
        string[][] before =
        [
            ["main", "config"], ["config", "vm prepared"], ["vm prepared", "vm built"], ["actor system", "vm built"],
            ["first output", "guest ended"], ["vm built", "guest ended"], ["guest ended", "stopped"],
        ];
        foreach (var pair in before)
        {
            Assert.True(at.ContainsKey(pair[0]) && at.ContainsKey(pair[1]), $"{pair[0]} or {pair[1]} missing: {line}");
            Assert.True(at[pair[0]] <= at[pair[1]], $"{pair[0]} after {pair[1]}: {line}");
        }
    }
}
