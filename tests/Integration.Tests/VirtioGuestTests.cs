using Akka.Actor;
using ActorVmm.Devices;
using ActorVmm.Host.Boot;
using ActorVmm.Host.Guests;
using ActorVmm.Host.Vm;
using ActorVmm.Testing;
using Iced.Intel;
using Xunit;
using static Iced.Intel.AssemblerRegisters;

namespace ActorVmm.Integration.Tests;

/// <summary>
/// A real guest drives the virtio entropy device (<c>--rng</c>, PCI 00:01.0) as a driver does: it scans
/// bus 0 through configuration mechanism #1, sizes BAR 0 and places it in the PCI memory window,
/// enables memory decoding and bus mastering (all through 0xCF8/0xCFC, which the host bridge passes
/// on to the function's actor), walks the capability list through ECAM to find the virtio
/// structures (virtio 1.2 §4.1.4) and MSI-X, initialises the device (§3.1.1: reset, ACKNOWLEDGE,
/// DRIVER, VIRTIO_F_VERSION_1, FEATURES_OK, queue 0, DRIVER_OK), makes a 64-byte buffer available
/// and notifies. The used buffer comes back with an MSI-X interrupt (its IDT handler records the
/// vector), or without MSI-X through INTA# and the IOAPIC (level, active low, GSI 17: the handler
/// reads the ISR, which drops the line). The guest then checks the used ring and that the device
/// overwrote the buffer's fill pattern. Every check failing exits with its own status.
/// </summary>
public sealed class VirtioGuestTests
{
    private const ulong Code = 0x10_0000;
    private const ulong Desc = 0x20_0000;     // descriptor table (16-byte aligned)
    private const ulong Avail = 0x20_1000;    // driver area
    private const ulong Used = 0x20_2000;     // device area
    private const ulong Buffer = 0x20_3000;   // the buffer the device fills
    private const int BufferLength = 64;
    private const ushort QueueSize = 8;
    private const byte Fill = 0xEE;

    private const ulong Flag = 0x9F900;       // byte: a handler ran
    private const ulong VectorSeen = 0x9F904; // dword: the vector of the last handler that ran
    private const ulong IsrSeen = 0x9F908;    // byte: the ISR value the INTx handler read
    private const ulong IsrAddress = 0x9F910; // qword: where the ISR byte is (for the INTx handler)

    private const byte QueueVector = 0x51;    // MSI-X table entry 0 (the queue)
    private const byte ConfigVector = 0x52;   // MSI-X table entry 1 (configuration changes)
    private const byte IntxVector = 0x53;     // IOAPIC pin 17
    private const int IntxGsi = 17;           // INTA# of slot 1 (PciInterruptRouting, the DSDT's _PRT)

    public enum Interrupts { MsiX, Intx }

    public static TheoryData<LapicMode, Interrupts> Cases => new()
    {
        { LapicMode.Emulated, Interrupts.MsiX },
        { LapicMode.Assisted, Interrupts.MsiX },
        { LapicMode.Emulated, Interrupts.Intx },
        { LapicMode.Assisted, Interrupts.Intx },
    };

    [KvmTheory]
    [MemberData(nameof(Cases))]
    public async Task A_guest_driver_gets_entropy_from_virtio_rng_and_its_interrupt(LapicMode lapic, Interrupts interrupts)
    {
        var image = Build(interrupts, hostile: false);
        await using var run = await GuestRun.StartAsync(new VmSpec("rng", 16 << 20, 1, image, lapic) { Rng = true });
        var outcome = await run.WaitAsync();
        Assert.True(outcome is { Kind: VmProtocol.OutcomeKind.DebugExit, ExitCode: 1 }, $"{outcome} (status {outcome.ExitCode >> 1})");
        var random = new byte[BufferLength];
        Assert.True(run.Vm.Memory.TryRead(new LibVmm.GuestPhysAddr(Buffer), random));
        Assert.True(random.Count(b => b == Fill) < BufferLength / 4, Convert.ToHexString(random));
    }

    /// <summary>A descriptor pointing outside guest RAM: the device does not touch it, sets
    /// DEVICE_NEEDS_RESET and signals a configuration change on its MSI-X vector (§2.1.2, §4.1.5.4);
    /// the guest sees both, resets the device and the VM goes on to its exit.</summary>
    [KvmTheory]
    [InlineData(LapicMode.Emulated)]
    [InlineData(LapicMode.Assisted)]
    public async Task A_descriptor_outside_ram_marks_the_device_broken_and_the_vm_goes_on(LapicMode lapic)
    {
        var image = Build(Interrupts.MsiX, hostile: true);
        await using var run = await GuestRun.StartAsync(new VmSpec("rng", 16 << 20, 1, image, lapic) { Rng = true });
        var outcome = await run.WaitAsync();
        Assert.True(outcome is { Kind: VmProtocol.OutcomeKind.DebugExit, ExitCode: 1 }, $"{outcome} (status {outcome.ExitCode >> 1})");
        var status = await run.StatusAsync(); // the device actor never failed
        Assert.Empty(status.Restarts ?? []);
    }

    /// <summary>
    /// A VM with the entropy device, its driver set up (BAR placed, MSI-X on, one buffer used), is
    /// snapshotted and restored in a new process (<c>run --restore</c>): the function's state record
    /// brings back its configuration space, MSI-X table and queue, and its BAR decodes where the guest
    /// put it before the first instruction, so the guest's second buffer comes back with its interrupt.
    /// </summary>
    [KvmTheory]
    [InlineData(LapicMode.Emulated)]
    [InlineData(LapicMode.Assisted)]
    public async Task A_vm_with_virtio_rng_snapshotted_and_restored_goes_on_using_the_device(LapicMode lapic)
    {
        var dir = Directory.CreateTempSubdirectory("actorvmm-rng-snapshot-").FullName;
        try
        {
            var snapshot = Path.Combine(dir, "snap");
            var gate = new HostGate();
            await using (var run = await GuestRun.StartAsync(new VmSpec("rng", 16 << 20, 1, Build(Interrupts.MsiX, false, snapshotted: true), lapic)
                         { Rng = true }, gate.Device()))
            {
                await gate.ReachedAsync(1, run);
                var answer = await run.Vm.Actor.Ask<VmProtocol.IVmMessage>(new VmProtocol.TakeSnapshot(snapshot, StopAfter: true),
                    TimeSpan.FromMinutes(3));
                Assert.IsType<VmProtocol.SnapshotTaken>(answer);
                await run.WaitAsync();
                Assert.Equal("A", run.Serial);
            }
            var serial = Path.Combine(dir, "serial.txt");
            var (code, _, err) = await ActorVmmProcess.RunAsync(TimeSpan.FromMinutes(5), "run", "--restore", snapshot, "--serial", serial,
                "--timeout", "240");
            Assert.True(code == 1, $"exit code {code} (status {code >> 1}); stderr:\n{err}");
        }
        finally
        {
            Directory.Delete(dir, recursive: true);
        }
    }

    /// <summary>
    /// The guest. Registers it keeps: R15 the slot, RBP the function's ECAM page, R14 BAR 0's address,
    /// R8 the common configuration, R9 the notify structure, R10 the notify-off multiplier, R11 the ISR,
    /// R12 the MSI-X capability's offset, R13 the MSI-X table.
    /// </summary>
    private static LongModeImage Build(Interrupts interrupts, bool hostile, bool snapshotted = false)
    {
        var a = new Assembler(64);
        var fail = a.CreateLabel();
        var hlt = a.CreateLabel();
        var handlerQueue = a.CreateLabel();
        var handlerConfig = a.CreateLabel();
        var handlerIntx = a.CreateLabel();
        Label? secondHlt = null;
        var driver = new VirtioDriverCode(a, fail);
        void Check(byte status, Action<Label> jumpIfBad) => driver.Check(status, jumpIfBad);

        foreach (var (vector, handler) in new[] { (QueueVector, handlerQueue), (ConfigVector, handlerConfig), (IntxVector, handlerIntx) })
            InterruptCode.SetGate(a, vector, handler);
        InterruptCode.EnableLocalApic(a);

        // 1-3. Find vendor 0x1AF4, device 0x1044 (virtio 1.x entropy, §4.1.2) on bus 0, size BAR 0 (a 64-bit
        // memory BAR) and place it at the memory window's base, walk the capability list through ECAM.
        driver.FindAndMap(ActorVmm.Devices.Virtio.VirtioRng.VirtioDeviceId, Platform.PciMmioWindowBase);
        a.mov(rdi, (long)IsrAddress);
        a.mov(__qword_ptr[rdi], r11);

        // 4. Interrupts: MSI-X entries 0 (queue) and 1 (configuration) to APIC 0, unmasked, MSI-X on;
        // or INTA#: its Interrupt Line must name GSI 17, routed level-triggered, active low.
        if (interrupts == Interrupts.MsiX)
            driver.EnableMsix(QueueVector, ConfigVector);
        else
        {
            a.cmp(__byte_ptr[rbp + 0x3C], IntxGsi);
            Check(12, l => a.jne(l));
            a.mov(rdi, InterruptCode.IoApicBase);
            a.mov(__dword_ptr[rdi], 0x10 + 2 * IntxGsi + 1);
            a.mov(__dword_ptr[rdi + 0x10], 0);                // destination APIC 0
            a.mov(__dword_ptr[rdi], 0x10 + 2 * IntxGsi);
            a.mov(__dword_ptr[rdi + 0x10], IntxVector | 1 << 13 | 1 << 15); // active low, level, unmasked
        }

        // 5. The rings, zeroed; the buffer, filled with the pattern.
        a.mov(rdi, (long)Desc);
        a.xor(eax, eax);
        a.mov(ecx, (int)(Buffer - Desc));
        a.rep.stosb();
        a.mov(rdi, (long)Buffer);
        a.mov(al, Fill);
        a.mov(ecx, BufferLength);
        a.rep.stosb();

        // 6. Initialisation (§3.1.1) through the common configuration (§4.1.4.3).
        a.mov(__byte_ptr[r8 + 0x14], 0);                     // reset
        a.cmp(__byte_ptr[r8 + 0x14], 0);
        Check(13, l => a.jne(l));
        a.mov(__byte_ptr[r8 + 0x14], 1);                     // ACKNOWLEDGE
        a.mov(__byte_ptr[r8 + 0x14], 3);                     // DRIVER
        a.mov(__dword_ptr[r8 + 0x00], 1);                    // device_feature_select: bits 32-63
        a.test(__dword_ptr[r8 + 0x04], 1);                   // VIRTIO_F_VERSION_1 offered
        Check(14, l => a.jz(l));
        a.mov(__dword_ptr[r8 + 0x08], 0);
        a.mov(__dword_ptr[r8 + 0x0C], 0);
        a.mov(__dword_ptr[r8 + 0x08], 1);
        a.mov(__dword_ptr[r8 + 0x0C], 1);                    // accept VERSION_1 only
        a.mov(__byte_ptr[r8 + 0x14], 0xB);                   // FEATURES_OK
        a.test(__byte_ptr[r8 + 0x14], 0x8);
        Check(15, l => a.jz(l));
        var vectors = interrupts == Interrupts.MsiX;
        a.mov(__word_ptr[r8 + 0x10], vectors ? (short)1 : unchecked((short)0xFFFF)); // config_msix_vector
        a.cmp(__word_ptr[r8 + 0x10], vectors ? (short)1 : unchecked((short)0xFFFF));
        Check(16, l => a.jne(l));
        a.mov(__word_ptr[r8 + 0x16], 0);                     // queue_select
        a.cmp(__word_ptr[r8 + 0x18], QueueSize);             // queue_size: at least ours
        Check(17, l => a.jb(l));
        a.mov(__word_ptr[r8 + 0x18], QueueSize);
        a.mov(__word_ptr[r8 + 0x1A], vectors ? (short)0 : unchecked((short)0xFFFF)); // queue_msix_vector
        a.cmp(__word_ptr[r8 + 0x1A], vectors ? (short)0 : unchecked((short)0xFFFF));
        Check(18, l => a.jne(l));
        a.mov(rax, (long)Desc);
        a.mov(__qword_ptr[r8 + 0x20], rax);
        a.mov(rax, (long)Avail);
        a.mov(__qword_ptr[r8 + 0x28], rax);
        a.mov(rax, (long)Used);
        a.mov(__qword_ptr[r8 + 0x30], rax);
        a.movzx(eax, __word_ptr[r8 + 0x1E]);                 // queue_notify_off
        a.imul(eax, r10d);
        a.add(r9, rax);                                      // queue 0's notify address
        a.mov(__word_ptr[r8 + 0x1C], 1);                     // queue_enable
        a.mov(__byte_ptr[r8 + 0x14], 0xF);                   // DRIVER_OK
        a.cmp(__byte_ptr[r8 + 0x14], 0xF);
        Check(19, l => a.jne(l));

        // 7. One device-writable buffer (or, hostile, one outside RAM), made available, notified.
        a.mov(rdi, (long)Desc);
        a.mov(rax, hostile ? 0x8000_0000L : (long)Buffer);
        a.mov(__qword_ptr[rdi], rax);
        a.mov(__dword_ptr[rdi + 8], BufferLength);
        a.mov(__word_ptr[rdi + 12], 2);                      // VIRTQ_DESC_F_WRITE
        a.mov(rdi, (long)Avail);
        a.mov(__word_ptr[rdi + 4], 0);                       // ring[0] = head 0
        a.mov(__word_ptr[rdi + 2], 1);                       // idx = 1 (after the entry: x86 keeps stores in order)
        a.mov(__word_ptr[r9], 0);                            // notify queue 0

        // 8. Sleep until a handler ran, then check which.
        var wait = a.CreateLabel();
        a.mov(rsi, (long)Flag);
        a.Label(ref wait);
        InterruptCode.SleepWithInterruptsOn(a, hlt);
        a.cli();
        a.cmp(__byte_ptr[rsi], 1);
        a.jne(wait);
        a.mov(rdi, (long)VectorSeen);
        var expected = hostile ? ConfigVector : interrupts == Interrupts.MsiX ? QueueVector : IntxVector;
        a.cmp(__dword_ptr[rdi], expected);
        Check(20, l => a.jne(l));

        if (hostile)
        {
            // 9. DEVICE_NEEDS_RESET is set, nothing was used; a reset clears the status.
            a.test(__byte_ptr[r8 + 0x14], 0x40);
            Check(21, l => a.jz(l));
            a.mov(rdi, (long)Used);
            a.cmp(__word_ptr[rdi + 2], 0);
            Check(22, l => a.jne(l));
            a.mov(__byte_ptr[r8 + 0x14], 0);
            a.cmp(__byte_ptr[r8 + 0x14], 0);
            Check(23, l => a.jne(l));
        }
        else
        {
            // 9. The used ring: idx 1, element { id 0, len 64 }; the buffer no longer the pattern.
            a.mov(rdi, (long)Used);
            a.cmp(__word_ptr[rdi + 2], 1);
            Check(24, l => a.jne(l));
            a.cmp(__dword_ptr[rdi + 4], 0);
            Check(25, l => a.jne(l));
            a.cmp(__dword_ptr[rdi + 8], BufferLength);
            Check(26, l => a.jne(l));
            var count = a.CreateLabel();
            var same = a.CreateLabel();
            a.mov(rdi, (long)Buffer);
            a.xor(edx, edx);                                 // bytes still equal to the pattern
            a.mov(ecx, BufferLength);
            a.Label(ref count);
            a.cmp(__byte_ptr[rdi], Fill);
            a.jne(same);
            a.inc(edx);
            a.Label(ref same);
            a.inc(rdi);
            a.dec(ecx);
            a.jnz(count);
            a.cmp(edx, BufferLength / 4);
            Check(27, l => a.jae(l));
            if (interrupts == Interrupts.Intx)
            {
                a.mov(rdi, (long)IsrSeen);
                a.cmp(__byte_ptr[rdi], 1);                   // the queue bit (§4.1.4.5)
                Check(28, l => a.jne(l));
            }
            if (snapshotted)
            {
                // 10. Say "A" on COM1 and wait at the gate, which this process never opens: the VM is
                // snapshotted here. Restored, the port has no device and reads all ones: the guest goes
                // on with a second buffer, through the BAR and the MSI-X vector it set up before.
                a.mov(dx, (ushort)Platform.Com1Port);
                a.mov(al, (byte)'A');
                a.@out(dx, al);
                HostGate.SignalAndWait(a, 1);
                a.mov(rdi, (long)Flag);
                a.mov(__byte_ptr[rdi], 0);
                a.mov(rdi, (long)VectorSeen);
                a.mov(__dword_ptr[rdi], 0);
                a.mov(rdi, (long)Desc + 16);
                a.mov(rax, (long)Buffer + 0x100);
                a.mov(__qword_ptr[rdi], rax);
                a.mov(__dword_ptr[rdi + 8], BufferLength);
                a.mov(__word_ptr[rdi + 12], 2);
                a.mov(rdi, (long)Avail);
                a.mov(__word_ptr[rdi + 6], 1);               // ring[1] = head 1
                a.mov(__word_ptr[rdi + 2], 2);
                a.mov(__word_ptr[r9], 0);
                var again = a.CreateLabel();
                var hlt2 = a.CreateLabel();
                a.mov(rsi, (long)Flag);
                a.Label(ref again);
                a.sti();
                a.Label(ref hlt2);
                a.hlt();
                a.cli();
                a.cmp(__byte_ptr[rsi], 1);
                a.jne(again);
                a.mov(rdi, (long)VectorSeen);
                a.cmp(__dword_ptr[rdi], QueueVector);
                Check(29, l => a.jne(l));
                a.mov(rdi, (long)Used);
                a.cmp(__word_ptr[rdi + 2], 2);
                Check(30, l => a.jne(l));
                a.cmp(__dword_ptr[rdi + 12], 1);
                Check(31, l => a.jne(l));
                a.cmp(__dword_ptr[rdi + 16], BufferLength);
                Check(32, l => a.jne(l));
                secondHlt = hlt2;
            }
        }
        a.mov(al, 0);
        a.@out(0xF4, al);
        a.Label(ref fail);
        a.mov(al, bl);
        a.@out(0xF4, al);
        a.hlt();

        // Handlers: record the vector (the INTx one also reads the ISR, dropping INTA#), EOI.
        foreach (var (vector, handler) in new[] { (QueueVector, handlerQueue), (ConfigVector, handlerConfig), (IntxVector, handlerIntx) })
        {
            var label = handler;
            a.Label(ref label);
            InterruptCode.ReturnPastInterruptedHlt(a, hlt);
            if (secondHlt is { } second) InterruptCode.ReturnPastInterruptedHlt(a, second);
            a.push(rax);
            a.push(rdi);
            a.mov(rdi, (long)VectorSeen);
            a.mov(__dword_ptr[rdi], vector);
            if (vector == IntxVector)
            {
                a.mov(rdi, (long)IsrAddress);
                a.mov(rdi, __qword_ptr[rdi]);
                a.mov(al, __byte_ptr[rdi]);
                a.mov(rdi, (long)IsrSeen);
                a.mov(__byte_ptr[rdi], al);
            }
            a.mov(rdi, (long)Flag);
            a.mov(__byte_ptr[rdi], 1);
            InterruptCode.Eoi(a);
            a.pop(rdi);
            a.pop(rax);
            a.iretq();
        }
        return new LongModeImage(GuestCode.Assemble(a, Code), Code, Code);
    }
}
