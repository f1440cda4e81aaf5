using System.Diagnostics;
using System.Runtime.InteropServices;
using System.Text.Json;
using ActorVmm.Host.Guests;
using ActorVmm.Testing;
using Iced.Intel;
using Xunit;
using static Iced.Intel.AssemblerRegisters;

namespace ActorVmm.Integration.Tests;

/// <summary>`actorvmm` as a user runs it, as a real process, with real guests.</summary>
public sealed partial class CliGuestTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("actorvmm-cli-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    [LibraryImport("libc", EntryPoint = "kill", SetLastError = true)]
    private static partial int Kill(int pid, int signal);

    private const int Sigint = 2;

    private static Process Start(params string[] args) => Start(new Dictionary<string, string>(), args);

    private static Process Start(IReadOnlyDictionary<string, string> environment, params string[] args)
    {
        var start = new ProcessStartInfo(Environment.GetEnvironmentVariable("DOTNET_HOST_PATH") ?? "dotnet")
        {
            RedirectStandardInput = true,
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            UseShellExecute = false,
        };
        foreach (var (name, value) in environment) start.Environment[name] = value;
        start.ArgumentList.Add(Path.Combine(AppContext.BaseDirectory, "actorvmm.dll"));
        foreach (var a in args) start.ArgumentList.Add(a);
        var p = Process.Start(start)!;
        p.StandardInput.Close();
        return p;
    }

    private static async Task<(int Code, string Out, string Err)> Finish(Process p, TimeSpan timeout)
    {
        var stdout = p.StandardOutput.ReadToEndAsync();
        var stderr = p.StandardError.ReadToEndAsync();
        using var cts = new CancellationTokenSource(timeout);
        try { await p.WaitForExitAsync(cts.Token); }
        catch (OperationCanceledException)
        {
            p.Kill(entireProcessTree: true);
            Assert.Fail($"actorvmm did not exit within {timeout.TotalSeconds} s: {await stderr}");
        }
        return (p.ExitCode, await stdout, await stderr);
    }

    private string Flat(Action<Assembler> body)
    {
        var a = new Assembler(16);
        body(a);
        var path = Path.Combine(_dir, "guest.bin");
        File.WriteAllBytes(path, GuestCode.Assemble(a, 0x7C00));
        return path;
    }

    [KvmFact]
    public async Task Demo_prints_the_greeting_and_its_message_trace_and_exits_0()
    {
        KvmRequirement.Check();
        var (code, stdout, stderr) = await Finish(Start("demo"), TimeSpan.FromSeconds(300));
        Assert.True(code == 0, stderr);
        Assert.Contains(DemoGuest.Greeting + DemoGuest.AfterInterrupt, stdout);
        Assert.Contains("message trace", stdout);
        Assert.Contains("reached the guest", stdout); // the interrupt's causal chain
        Assert.Contains("InterruptAccepted", stdout);
        Assert.Contains("vcpu-0", stdout);
        Assert.Contains("uart0", stdout);
    }

    /// <summary>
    /// `run --test-devices` gives the guest QEMU's pc-testdev: its scratch register at port 0xE0 reads
    /// back what the guest wrote, which the guest hands to debug-exit (status (0x2A &lt;&lt; 1) | 1 = 85).
    /// Without the switch the port is unassigned and reads all ones (status (0xFF &lt;&lt; 1) | 1).
    /// </summary>
    [KvmFact]
    public async Task Run_with_test_devices_gives_the_guest_the_scratch_register()
    {
        KvmRequirement.Check();
        var image = Flat(a =>
        {
            a.mov(eax, 0x2A);
            a.@out(0xE0, eax);
            a.mov(eax, 0);
            a.@in(eax, 0xE0);
            a.@out(0xF4, al);
            a.cli();
            a.hlt();
        });
        var (on, _, onErr) = await Finish(Start("run", "--test-devices", "--flat", image, "--serial", Path.Combine(_dir, "on.txt")),
            TimeSpan.FromSeconds(300));
        Assert.True(on == 85, $"exit {on}: {onErr}");
        var (off, _, offErr) = await Finish(Start("run", "--flat", image, "--serial", Path.Combine(_dir, "off.txt")), TimeSpan.FromSeconds(300));
        Assert.True(offErr.Contains("exit status 511", StringComparison.Ordinal), $"exit {off}: {offErr}");
    }

    [KvmFact]
    public async Task Run_with_an_assisted_lapic_ends_with_code_0_when_the_guest_halts_with_interrupts_off()
    {
        // With the local APIC in KVM, HLT sleeps inside KVM_RUN and never exits: the vcpu learns of
        // it from its periodic halt probe, which must kick it out of the kernel to look.
        KvmRequirement.Check();
        var image = Flat(a =>
        {
            a.mov(dx, 0x3F8);
            a.mov(al, (byte)'H');
            a.@out(dx, al);
            a.cli();
            a.hlt();
        });
        var serial = Path.Combine(_dir, "serial.txt");
        var (code, _, stderr) = await Finish(
            Start("run", "--lapic", "assisted", "--flat", image, "--load-address", "0x7C00", "--serial", serial), TimeSpan.FromSeconds(300));
        Assert.True(code == 0, $"exit {code}: {stderr}");
        Assert.Contains("halted with interrupts disabled", stderr);
        Assert.Equal("H", File.ReadAllText(serial));
    }

    [KvmFact]
    public async Task Ctrl_c_stops_a_spinning_guest_cleanly_with_code_130()
    {
        KvmRequirement.Check();
        var image = Flat(a =>
        {
            var spin = a.CreateLabel();
            a.mov(dx, 0x3F8);
            a.mov(al, (byte)'S');
            a.@out(dx, al);
            a.Label(ref spin);
            a.jmp(spin);
        });
        var p = Start("run", "--flat", image, "--load-address", "0x7C00", "--serial", Path.Combine(_dir, "serial.txt"));
        // Wait until the guest has run (its byte reached the serial file), then interrupt. (A slow
        // machine may take long to start the host process: a SIGINT before its handler is installed
        // would kill it without the clean stop this test is about.)
        var deadline = DateTime.UtcNow.AddSeconds(300);
        while (DateTime.UtcNow < deadline && !p.HasExited && !(File.Exists(Path.Combine(_dir, "serial.txt")) &&
                                               File.ReadAllText(Path.Combine(_dir, "serial.txt")).Contains('S')))
            await Task.Delay(50);
        Assert.True(File.Exists(Path.Combine(_dir, "serial.txt")) && File.ReadAllText(Path.Combine(_dir, "serial.txt")) == "S",
            "the guest did not print S");
        Assert.Equal(0, Kill(p.Id, Sigint));
        var (code, _, stderr) = await Finish(p, TimeSpan.FromSeconds(60));
        Assert.True(code == 130, $"exit {code}: {stderr}");
        Assert.Contains("interrupted", stderr);
        Assert.Equal("S", File.ReadAllText(Path.Combine(_dir, "serial.txt")));
    }

    [KvmFact]
    public async Task Run_writes_serial_output_to_a_file_and_the_trace_as_json_lines()
    {
        KvmRequirement.Check();
        var image = Flat(a =>
        {
            foreach (var c in "ok\n")
            {
                a.mov(dx, 0x3F8);
                a.mov(al, (byte)c);
                a.@out(dx, al);
            }
            a.mov(al, 4);
            a.@out(0xF4, al);
        });
        var serial = Path.Combine(_dir, "serial.txt");
        var trace = Path.Combine(_dir, "trace.jsonl");
        var (code, stdout, stderr) = await Finish(
            Start("run", "--flat", image, "--load-address", "0x7C00", "--serial", serial, "--trace", trace), TimeSpan.FromSeconds(300));
        Assert.True(code == 9, $"exit {code}: {stderr}");
        Assert.Equal("", stdout);
        Assert.Equal("ok\n", File.ReadAllText(serial));
        var lines = File.ReadAllLines(trace);
        Assert.NotEmpty(lines);
        var writes = 0;
        foreach (var line in lines)
        {
            using var doc = JsonDocument.Parse(line);
            var root = doc.RootElement;
            Assert.True(root.GetProperty("t_ns").GetInt64() >= 0);
            if (root.GetProperty("sender").GetString() == "vcpu-0" && root.GetProperty("receiver").GetString() == "uart0" &&
                root.GetProperty("type").GetString() == "Write")
                writes++;
        }
        Assert.Equal(3, writes);
        Assert.Contains(lines, l => l.Contains("\"GuestExitRequested\""));
    }
}
