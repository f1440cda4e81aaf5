using System.Buffers.Binary;
using System.Net;
using System.Net.Sockets;
using System.Text;
using ActorVmm.Devices.Virtio;
using ActorVmm.Host.Boot;
using ActorVmm.Host.Tests;
using ActorVmm.Host.Vm;
using ActorVmm.LibVmm;
using ActorVmm.Memory;
using ActorVmm.Testing;
using Iced.Intel;
using Xunit;
using Xunit.Abstractions;
using static Iced.Intel.AssemblerRegisters;

namespace ActorVmm.Integration.Tests;

/// <summary>
/// Whether this KVM delivers a guest's <c>int3</c> to the guest's own IDT (#BP, vector 3), as a
/// processor does. kvm_pvm's instruction emulator lacks int3 (KVM_EXIT_INTERNAL_ERROR), and a
/// Linux kernel dies at its int3 self-test there: Linux boot tests skip on such a KVM. The probe
/// is a 64-bit guest (entered as <see cref="LongModeImage"/> enters one) that points IDT vector 3
/// at a handler, runs int3, and reports from the handler on an I/O port; run once per process
/// on LibVmm directly (no actors), in milliseconds.
/// </summary>
public static class Int3Probe
{
    public const byte ReportPort = 0x10;
    public const byte Delivered = (byte)'B', NotDelivered = (byte)'N';
    private const ulong CodeAddress = 0x10000, IdtAddress = 0x20000, IdtrAddress = 0x21000;

    private static readonly Lazy<string?> Result = new(Run);

    /// <summary>Why int3 does not reach the guest's handler on this KVM, or null when it does.</summary>
    public static string? Failure => Result.Value;

    public static byte[] Code()
    {
        var a = new Assembler(64);
        var handler = a.CreateLabel();
        // IDT gate 3 (SDM Vol. 3A §6.14.1, 64-bit interrupt gate): offset, CS 0x08, P | type 0xE.
        a.lea(rax, __[handler]);
        a.mov(rdi, IdtAddress + 3 * 16);
        a.mov(__word_ptr[rdi], ax);
        a.mov(__word_ptr[rdi + 2], (ushort)LongModeImage.CodeSelector);
        a.mov(__word_ptr[rdi + 4], 0x8E00);
        a.shr(rax, 16);
        a.mov(__word_ptr[rdi + 6], ax);
        a.shr(rax, 16);
        a.mov(__dword_ptr[rdi + 8], eax);
        a.mov(__dword_ptr[rdi + 12], 0);
        a.mov(rdi, IdtrAddress);
        a.mov(__word_ptr[rdi], 16 * 256 - 1);
        a.mov(rax, IdtAddress);
        a.mov(__qword_ptr[rdi + 2], rax);
        a.lidt(__[rdi]);
        a.int3();
        a.mov(al, NotDelivered); // the handler does not return: reaching this is a wrong delivery
        a.@out(ReportPort, al);
        a.hlt();
        a.Label(ref handler);
        a.mov(al, Delivered);
        a.@out(ReportPort, al);
        a.hlt();
        using var stream = new MemoryStream();
        a.Assemble(new StreamCodeWriter(stream), CodeAddress);
        return stream.ToArray();
    }

    private static string? Run()
    {
        using var kvm = Kvm.Open();
        using var vm = kvm.CreateVm();
        using var memory = VmspaceLayout.Build(2 << 20);
        memory.RegisterWith(vm);
        var boot = new LongModeImage(Code(), CodeAddress, CodeAddress).Load(memory);
        using var vcpu = vm.CreateVcpu(0, CpuidPolicy.ForPlatform(kvm.GetSupportedCpuid()));
        boot.ApplyTo(vcpu);
        for (var i = 0; i < 1000; i++)
        {
            switch (vcpu.Run())
            {
                case VmExit.Intr:
                    continue;
                case VmExit.Io { IsOut: true, Port: ReportPort, Value: Delivered }:
                    return null;
                case VmExit.Io { IsOut: true, Port: ReportPort, Value: NotDelivered }:
                    return "int3 did not reach the guest's #BP handler: execution went on after it";
                case VmExit.InternalError e:
                    return $"KVM cannot run a guest's int3 (KVM_EXIT_INTERNAL_ERROR, suberror {e.Suberror}): its instruction emulator lacks it, as kvm_pvm's does";
                case var other:
                    return $"int3 did not reach the guest's #BP handler: the probe guest exited with {other}";
            }
        }
        return "the int3 probe guest was interrupted 1000 times in a row";
    }
}

/// <summary>A theory that boots Linux: it needs KVM (as <see cref="KvmTheoryAttribute"/>), the guest kit
/// (<see cref="GuestKit"/>; under <c>ACTORVMM_REQUIRE_KVM=1</c> a missing kit fails the test), and a KVM
/// that delivers int3 to the guest (<see cref="Int3Probe"/>); skipped with the reason otherwise.</summary>
public sealed class LinuxBootTheoryAttribute : TheoryAttribute
{
    public LinuxBootTheoryAttribute()
    {
        if (KvmRequirement.SkipReason is { } kvm) Skip = kvm;
        else if (GuestKit.Missing is { } missing && !KvmRequirement.Required) Skip = missing;
        else if (KvmRequirement.Unavailability is null && Int3Probe.Failure is { } int3)
            Skip = $"Linux cannot boot on this KVM: {int3}";
    }
}

/// <summary>A Linux boot fact that also needs a TAP in a network namespace of its own (as
/// <see cref="KvmTapTheoryAttribute"/>): skipped naming what is missing.</summary>
public sealed class LinuxBootTapFactAttribute : FactAttribute
{
    public LinuxBootTapFactAttribute()
    {
        if (new LinuxBootTheoryAttribute().Skip is { } linux) Skip = linux;
        else if (IpTool.Unavailability() is { } tap) Skip = tap;
    }
}

/// <summary>A KVM fact whose expectation holds in the KVM box (a full x86 CPU under a real kvm_amd)
/// and is the host KVM's to decide elsewhere: skipped outside the box.</summary>
public sealed class KvmBoxFactAttribute : FactAttribute
{
    public KvmBoxFactAttribute()
    {
        if (KvmRequirement.SkipReason is { } kvm) Skip = kvm;
        else if (!KvmBox.Inside) Skip = $"runs in the KVM box ({KvmBox.Variable}=1) only: elsewhere whether int3 reaches the guest is the host KVM's answer (kvm_pvm's emulator lacks int3)";
    }
}

/// <summary>
/// A Debian kernel (the KVM box's, a real bzImage) booted through the 64-bit boot protocol under
/// ActorVmm. In the box the kernel is slow (QEMU TCG under nested KVM): the limits are generous,
/// and the test stops the VM once it has seen what it checks.
/// </summary>
public sealed class LinuxBootGuestTests(ITestOutputHelper output)
{
    private static readonly TimeSpan BootLimit = TimeSpan.FromMinutes(4);

    /// <summary>The box's CPU is a full x86 one (QEMU TCG) under a real kvm_amd: int3 must reach the guest.</summary>
    [KvmBoxFact]
    public void The_int3_probe_finds_int3_delivered_to_the_guests_handler_in_the_kvm_box()
    {
        var failure = Int3Probe.Failure;
        output.WriteLine($"int3 probe: {failure ?? "delivered to the guest's #BP handler"}");
        Assert.Null(failure);
    }

    /// <summary>Each vcpu's state, exit counts and RIP, and each vlapic's pending and in-service vectors.</summary>
    private static async Task<string> Probe(GuestRun run, int cpus, LapicMode lapic)
    {
        var text = new StringBuilder($"probe at {DateTime.UtcNow:HH:mm:ss.fff}: {await run.StatusAsync()}\n");
        for (var i = 0; i < cpus; i++)
        {
            try
            {
                var stats = await run.AskChild<ActorVmm.Vcpu.VcpuProtocol.Stats>($"vcpu-{i}", ActorVmm.Vcpu.VcpuProtocol.GetStats.Instance);
                text.AppendLine($"  vcpu {i}: {stats.State} exits={stats.Exits} io={stats.IoExits} mmio={stats.MmioExits} hlt={stats.HltExits} " +
                                $"intr={stats.IntrExits} injected={stats.Injected}; " +
                                string.Join(", ", stats.Reasons.Select(r => $"{r.Reason}={r.Count}")));
                var regs = await run.AskChild<ActorVmm.Vcpu.VcpuProtocol.Registers>($"vcpu-{i}", ActorVmm.Vcpu.VcpuProtocol.GetRegisters.Instance);
                text.AppendLine($"  vcpu {i}: rip={regs.General.Rip:X} rflags={regs.General.Rflags:X} cr8/tpr? state={regs.State}");
                if (lapic == LapicMode.Emulated)
                {
                    var apic = (await run.AskChild<ActorVmm.Lapic.VlapicProtocol.StateReply>($"vlapic-{i}", ActorVmm.Lapic.VlapicProtocol.GetState.Instance)).State;
                    string Bits(int at) => string.Join(",", Enumerable.Range(0, 256)
                        .Where(v => (BinaryPrimitives.ReadUInt32LittleEndian(apic.ApicPage.AsSpan().Slice(at + v / 32 * 16)) >> (v % 32) & 1) != 0)
                        .Select(v => $"0x{v:X2}"));
                    text.AppendLine($"  vlapic {i}: irr=[{Bits(0x200)}] isr=[{Bits(0x100)}] tpr=0x{apic.ApicPage[0x80]:X2} " +
                                    $"lvt-timer=0x{BinaryPrimitives.ReadUInt32LittleEndian(apic.ApicPage.AsSpan().Slice(0x320)):X} armed={apic.TimerArmed} " +
                                    $"deadline={apic.TscDeadline} tmict=0x{BinaryPrimitives.ReadUInt32LittleEndian(apic.ApicPage.AsSpan().Slice(0x380)):X}");
                }
            }
            catch (Exception e)
            {
                text.AppendLine($"  vcpu {i}: no answer ({e.GetType().Name}: {e.Message})");
            }
        }
        return text.ToString();
    }

    /// <summary>
    /// Boots <paramref name="spec"/> (started by <paramref name="start"/>, else in this process) and checks
    /// what every boot of the kit must show: the banner with the release of the image's own kernel_version
    /// string (so it is this kernel that printed it), every vcpu brought up ("smp: Brought up 1 node, N
    /// CPUs"), the init's marker line with the CPU count it sees in /proc/cpuinfo, the init's last line,
    /// and then the VM ending as the guest's ACPI S5 (PM1a_CNT) says: powered off, exit code 0. Along the
    /// way no kernel warning or oops (a "Call Trace:", "BUG:") and no "unchecked MSR access error" (a
    /// paravirtual MSR the platform shows but cannot serve). A VM still running at <see cref="BootLimit"/>
    /// is probed (vcpu states, exits, RIPs, pending vectors) for the test's output, then stopped.
    /// Answers the console's lines.
    /// </summary>
    private async Task<(string[] Lines, string Tail)> BootChecked(VmSpec spec, string release, Func<Task<GuestRun>>? start = null)
    {
        var cpus = spec.Cpus;
        string serial;
        VmProtocol.Outcome? outcome = null;
        await using (var run = await (start ?? (() => GuestRun.StartAsync(spec)))())
        {
            if (await Task.WhenAny(run.Vm.Ended, Task.Delay(BootLimit)) == run.Vm.Ended) outcome = await run.Vm.Ended;
            else
            {
                // Where it is, twice, 10 s apart: whether the vcpus still exit (and where) or wait.
                output.WriteLine(await Probe(run, cpus, spec.Lapic));
                await Task.Delay(10_000);
                output.WriteLine(await Probe(run, cpus, spec.Lapic));
            }
            serial = run.Serial.Replace("\r", "");
        }
        output.WriteLine($"outcome: {outcome?.ToString() ?? "still running"}; last console lines ({serial.Length} bytes):");
        foreach (var line in serial.Split('\n').TakeLast(30)) output.WriteLine(line);
        var tail = serial[Math.Max(0, serial.Length - 3000)..];
        var state = outcome is null ? $"the VM still ran after {BootLimit}" : $"the VM ended: {outcome}";

        Assert.True(serial.Contains($"Linux version {release}"), $"no \"Linux version {release}\" on the serial console; {state}; it printed: {tail}");
        Assert.True(serial.Contains($"smp: Brought up 1 node, {cpus} CPU"), $"the kernel did not bring up {cpus} vcpu(s); {state}; its last lines: {tail}");
        var lines = serial.Split('\n');
        var marker = lines.FirstOrDefault(l => l.StartsWith(GuestKit.InitMarker, StringComparison.Ordinal));
        Assert.True(marker is not null, $"the kernel did not reach the init's \"{GuestKit.InitMarker}\"; {state}; its last lines: {tail}");
        Assert.Contains($" cpus={cpus} ", marker);
        Assert.Contains($"kernel={release}", marker);
        Assert.True(serial.Contains(GuestKit.DoneMarker), $"the init did not finish; {state}; its last lines: {tail}");
        Assert.True(outcome is { Kind: VmProtocol.OutcomeKind.PowerOff, ExitCode: VmProtocol.Outcome.PowerOffCode },
            $"the guest's poweroff did not end the VM; {state}; its last lines: {tail}");
        foreach (var bad in new[] { "Call Trace:", "unchecked MSR access error", "BUG:" })
        {
            var at = serial.IndexOf(bad, StringComparison.Ordinal);
            if (at >= 0) Assert.Fail($"the kernel printed \"{bad}\": {serial[Math.Max(0, at - 600)..Math.Min(serial.Length, at + 600)]}");
        }
        return (lines, tail);
    }

    /// <summary>The kernel_version string of a bzImage's header (boot.rst: at 0x200 + the field at 0x20E).</summary>
    private static string KernelVersion(byte[] kernel)
    {
        var at = 0x200 + BinaryPrimitives.ReadUInt16LittleEndian(kernel.AsSpan(0x20E));
        var end = Array.IndexOf(kernel, (byte)0, at);
        return Encoding.ASCII.GetString(kernel, at, end - at);
    }

    /// <summary>
    /// The guest kit's Debian kernel, entered through the 64-bit boot protocol (vmlinuz) or its PVH
    /// note (vmlinux), with a virtio disk (a real file) and the virtio entropy device, booted as
    /// <see cref="BootChecked"/> checks; besides: the line the test put in the disk's sector 0 read back
    /// by the guest, the guest's line in sector 1 of the file (written with fsync), and virtio-rng as the
    /// guest's hardware RNG. No clock or platform option on the kernel's command line.
    /// </summary>
    [LinuxBootTheory]
    [KvmData("vmlinuz", 1, LapicMode.Emulated)]
    [KvmData("vmlinux", 1, LapicMode.Emulated)]
    [KvmData("vmlinuz", 2, LapicMode.Emulated)]
    [KvmData("vmlinuz", 1, LapicMode.Assisted, NotInKvmBox = BoxLimits.KvmLapicTimerForLinux)]
    public async Task The_debian_kernel_boots_to_its_init_uses_its_disk_and_powers_the_vm_off(string image, int cpus, LapicMode lapic)
    {
        Assert.True(GuestKit.Missing is null, GuestKit.Missing);
        var release = KernelVersion(await File.ReadAllBytesAsync(GuestKit.Vmlinuz!)).Split(' ')[0];
        var kernelPath = image == "vmlinux" ? GuestKit.Vmlinux! : GuestKit.Vmlinuz!;
        var dir = Directory.CreateTempSubdirectory("actorvmm-linux-");
        try
        {
            var disk = Path.Combine(dir.FullName, "disk.img");
            var nonce = Guid.NewGuid().ToString("N");
            var sectors = new byte[1 << 20];
            Encoding.ASCII.GetBytes($"ACTORVMM-DISK-IN {nonce}\n").CopyTo(sectors, 0);
            await File.WriteAllBytesAsync(disk, sectors);
            var boot = KernelKind.Recognise(await File.ReadAllBytesAsync(kernelPath), kernelPath, "console=ttyS0 panic=-1",
                await File.ReadAllBytesAsync(GuestKit.Initrd!), "initrd.img");
            var lines = (await BootChecked(new VmSpec("linux", 256UL << 20, cpus, boot, Lapic: lapic) { Disk = new DiskSpec(disk), Rng = true },
                release)).Lines;
            Assert.Contains($"ACTORVMM-DISK-READ ACTORVMM-DISK-IN {nonce}", lines);
            Assert.Contains("ACTORVMM-DISK-WRITE ok", lines);
            Assert.Contains("ACTORVMM-RNG virtio_rng.0", lines);
            // The file after the VM is gone: the guest's line in sector 1, sector 0 as the test wrote it.
            var after = await File.ReadAllBytesAsync(disk);
            var written = $"ACTORVMM-DISK-WRITTEN cpus={cpus}\n";
            Assert.Equal(written, Encoding.ASCII.GetString(after, 512, written.Length));
            Assert.Equal(sectors.AsSpan(0, 512).ToArray(), after.AsSpan(0, 512).ToArray());
        }
        finally
        {
            dir.Delete(recursive: true);
        }
    }
    /// <summary>
    /// A kernel that panics with <c>panic=-1</c> on its command line restarts the machine at once (Linux's
    /// emergency restart: the FADT's reset register first, then the keyboard controller), and a guest's
    /// reset ends the VM with the reset code, 8. Here the panic is the kernel's own when the init the
    /// command line names is not in the initramfs and there is no root file system to fall back on.
    /// </summary>
    [LinuxBootTheory]
    [KvmData("vmlinux")]
    public async Task A_kernel_panic_with_panic_minus_1_ends_the_vm_with_the_reset_code(string image)
    {
        Assert.True(GuestKit.Missing is null, GuestKit.Missing);
        var kernelPath = image == "vmlinux" ? GuestKit.Vmlinux! : GuestKit.Vmlinuz!;
        var boot = KernelKind.Recognise(await File.ReadAllBytesAsync(kernelPath), kernelPath,
            "console=ttyS0 panic=-1 rdinit=/actorvmm-no-such-init", await File.ReadAllBytesAsync(GuestKit.Initrd!), "initrd.img");
        await using var run = await GuestRun.StartAsync(new VmSpec("linux-panic", 256UL << 20, 1, boot));
        var outcome = await run.WaitAsync(BootLimit);
        var serial = run.Serial.Replace("\r", "");
        var tail = serial[Math.Max(0, serial.Length - 3000)..];
        Assert.True(serial.Contains("Kernel panic - not syncing"), $"no kernel panic on the console; the VM ended: {outcome}; its last lines: {tail}");
        Assert.True(outcome is { Kind: VmProtocol.OutcomeKind.Reset, ExitCode: VmProtocol.Outcome.ResetCode },
            $"the panic did not end the VM with a reset: {outcome}; its last lines: {tail}");
    }

    /// <summary>
    /// The kit's kernel on 2 vcpus with a virtio-net card on a TAP in a network namespace the test makes
    /// (the host's end 10.0.2.2/24), booted as <see cref="BootChecked"/> checks: Linux's own virtio_net
    /// driver brings eth0 up with the card's MAC, the guest's ping of the host's end is answered, and a
    /// TCP connection from the guest to a listener of the test's in the namespace carries a line each way,
    /// each checked where it arrives (the test reads the guest's MAC; the guest prints the test's nonce).
    /// </summary>
    [LinuxBootTapFact]
    public async Task The_debian_kernel_talks_tcp_over_its_virtio_net_card()
    {
        Assert.True(GuestKit.Missing is null, GuestKit.Missing);
        var release = KernelVersion(await File.ReadAllBytesAsync(GuestKit.Vmlinuz!)).Split(' ')[0];
        using var ns = TapNamespace.Create();
        IpTool.Run("-n", ns.Name, "addr", "add", "10.0.2.2/24", "dev", ns.Tap);
        using var listener = ns.InNamespace(() =>
        {
            var l = new TcpListener(IPAddress.Parse("10.0.2.2"), 0);
            l.Start();
            return l;
        });
        var port = ((IPEndPoint)listener.LocalEndpoint).Port;
        var mac = new MacAddress(0x52_54_00_12_34_56);
        var nonce = Guid.NewGuid().ToString("N");
        var heard = Task.Run(async () =>
        {
            using var client = await listener.AcceptTcpClientAsync();
            using var stream = client.GetStream();
            using var reader = new StreamReader(stream, Encoding.ASCII);
            var line = await reader.ReadLineAsync() ?? "";
            await stream.WriteAsync(Encoding.ASCII.GetBytes($"ACTORVMM-NET-ECHO {nonce}\n"));
            return line;
        });
        var boot = KernelKind.Recognise(await File.ReadAllBytesAsync(GuestKit.Vmlinuz!), GuestKit.Vmlinuz!,
            $"console=ttyS0 panic=-1 actorvmm.net=10.0.2.15/24,10.0.2.2,{port}", await File.ReadAllBytesAsync(GuestKit.Initrd!), "initrd.img");
        var spec = new VmSpec("linux-net", 256UL << 20, 2, boot) { Net = new NetSpec(ns.Tap, mac), Rng = true };
        var (lines, tail) = await BootChecked(spec, release, () => ns.InNamespace(() => GuestRun.StartAsync(spec)));

        Assert.Contains("ACTORVMM-NET eth0 52:54:00:12:34:56", lines);
        Assert.True(lines.Contains("ACTORVMM-PING 10.0.2.2 ok"), $"the guest's ping was not answered; its last lines: {tail}");
        Assert.True(heard.IsCompleted, $"no connection from the guest reached the listener; its last lines: {tail}");
        Assert.Equal("ACTORVMM-NET-HELLO 52:54:00:12:34:56", await heard);
        Assert.Contains($"ACTORVMM-NET-REPLY ACTORVMM-NET-ECHO {nonce}", lines);
    }
}
