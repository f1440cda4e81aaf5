using System.Buffers.Binary;
using System.Text;
using ActorVmm.Host.Boot;
using ActorVmm.Host.Guests;
using ActorVmm.Host.Vm;
using ActorVmm.LibVmm;
using ActorVmm.Testing;
using Iced.Intel;
using Xunit;
using static Iced.Intel.AssemblerRegisters;

namespace ActorVmm.Integration.Tests;

/// <summary>
/// Real 64-bit guests against the PC platform's reset ports (0x92, 0xCF9) and its ACPI tables and
/// PM block, as a guest OS or a test kernel uses them: it writes the reset ports and reads them
/// back, finds the RSDP in the BIOS area and walks XSDT → FACP → FACS/DSDT checking signatures
/// and checksums, times itself on the PM timer the FADT names, and powers off through PM1a_CNT
/// with the SLP_TYP it parsed out of the DSDT's \_S5. A guest reports a failed check through
/// debug-exit with the value of that check (status 2v+1); a passed one with 0 (status 1), or
/// by ending the machine the way under test.
/// </summary>
public sealed class PlatformGuestTests
{
    private const ulong Code = 0x10_0000;
    private const ulong Marker = 0x20_0000; // the S5 guest's "went on after another sleep type"

    private static LongModeImage Long(Action<Assembler> body)
    {
        var a = new Assembler(64);
        body(a);
        return new LongModeImage(GuestCode.Assemble(a, Code), Code, Code);
    }

    private static int Ascii4(string s) => BinaryPrimitives.ReadInt32LittleEndian(Encoding.ASCII.GetBytes(s));

    /// <summary>Debug-exit with <paramref name="value"/> (status 2v+1), then halt.</summary>
    private static void Exit(Assembler a, byte value)
    {
        a.mov(al, value);
        a.@out(0xF4, al);
        a.cli();
        a.hlt();
    }

    /// <summary>The guest's failed checks: one label per value, each a debug-exit with it, emitted by <see cref="Emit"/>.</summary>
    private sealed class Failures(Assembler a)
    {
        private readonly SortedDictionary<byte, Label> _labels = [];

        public Label this[byte value]
        {
            get
            {
                if (!_labels.TryGetValue(value, out var label)) _labels[value] = label = a.CreateLabel();
                return label;
            }
        }

        public void Emit()
        {
            foreach (var (value, label) in _labels)
            {
                var l = label;
                a.Label(ref l);
                Exit(a, value);
            }
        }
    }

    // What each failure value means, for the assertion messages.
    private const byte NoRsdp = 2, BadRsdp = 3, BadXsdt = 4, NoFacp = 5, BadFacp = 6, BadFacs = 7, BadDsdt = 8,
        TimerTooWide = 9, TimerWentBack = 10, TimerStood = 11, NoS5 = 12, BadPm1Control = 13, StillOn = 14;

    private static string Explain(VmProtocol.Outcome outcome) => outcome.Kind != VmProtocol.OutcomeKind.DebugExit
        ? outcome.ToString()
        : (outcome.ExitCode >> 1) switch
        {
            NoRsdp => "no RSDP in 0xE0000-0xFFFFF",
            BadRsdp => "RSDP checksum",
            BadXsdt => "XSDT signature or checksum",
            NoFacp => "no FACP in the XSDT",
            BadFacp => "FACP checksum",
            BadFacs => "FACS signature, length, alignment or X_FIRMWARE_CTRL",
            BadDsdt => "DSDT signature, checksum or X_DSDT",
            TimerTooWide => "PM timer port 0 or a value of 2^24 or more",
            TimerWentBack => "PM timer went backwards",
            TimerStood => "PM timer did not advance",
            NoS5 => "no \\_S5 package in the DSDT",
            BadPm1Control => "PM1_CNT: SCI_EN not 1 or SLP_EN not 0",
            StillOn => "the guest still ran after its write",
            _ => outcome.ToString(),
        };

    /// <summary>AL = the byte sum of RCX bytes at RDI (clobbers RDI, RCX); a sum other than 0 goes to <paramref name="bad"/>.</summary>
    private static void Checksum(Assembler a, Label bad)
    {
        var loop = a.CreateLabel();
        a.xor(eax, eax);
        a.Label(ref loop);
        a.add(al, __byte_ptr[rdi]);
        a.inc(rdi);
        a.dec(rcx);
        a.jnz(loop);
        a.test(al, al);
        a.jnz(bad);
    }

    /// <summary>
    /// Finds the ACPI tables as an OS does: the RSDP on a 16-byte boundary in 0xE0000-0xFFFFF, its
    /// XSDT, the XSDT entry signed FACP, then the FACS and DSDT it points at, checking each one's
    /// signature and checksum (the FACS has none: its length and 64-byte alignment). Leaves
    /// RBX = FADT, R14 = FACS, R15 = DSDT.
    /// </summary>
    private static void FindTables(Assembler a, Failures fail)
    {
        var scan = a.CreateLabel();
        var foundRsdp = a.CreateLabel();
        var entry = a.CreateLabel();
        var foundFacp = a.CreateLabel();

        a.mov(rsi, 0xE0000);
        a.mov(rax, BinaryPrimitives.ReadInt64LittleEndian(Encoding.ASCII.GetBytes("RSD PTR ")));
        a.Label(ref scan);
        a.cmp(__qword_ptr[rsi], rax);
        a.je(foundRsdp);
        a.add(rsi, 16);
        a.cmp(rsi, 0x10_0000);
        a.jb(scan);
        a.jmp(fail[NoRsdp]);

        a.Label(ref foundRsdp);
        a.mov(r12, rsi);
        a.mov(rdi, r12);
        a.mov(ecx, 20);
        Checksum(a, fail[BadRsdp]);

        a.mov(r13, __qword_ptr[r12 + 24]);             // XsdtAddress
        a.cmp(__dword_ptr[r13], Ascii4("XSDT"));
        a.jne(fail[BadXsdt]);
        a.mov(rdi, r13);
        a.mov(ecx, __dword_ptr[r13 + 4]);
        Checksum(a, fail[BadXsdt]);

        a.mov(ecx, __dword_ptr[r13 + 4]);
        a.sub(ecx, 36);
        a.shr(ecx, 3);                                 // entries
        a.lea(rsi, __[r13 + 36]);
        a.Label(ref entry);
        a.test(ecx, ecx);
        a.jz(fail[NoFacp]);
        a.mov(rbx, __qword_ptr[rsi]);
        a.cmp(__dword_ptr[rbx], Ascii4("FACP"));
        a.je(foundFacp);
        a.add(rsi, 8);
        a.dec(ecx);
        a.jmp(entry);

        a.Label(ref foundFacp);
        a.mov(rdi, rbx);
        a.mov(ecx, __dword_ptr[rbx + 4]);
        Checksum(a, fail[BadFacp]);

        a.mov(r14d, __dword_ptr[rbx + 36]);            // FIRMWARE_CTRL
        a.cmp(__qword_ptr[rbx + 132], r14);            // X_FIRMWARE_CTRL: the same
        a.jne(fail[BadFacs]);
        a.cmp(__dword_ptr[r14], Ascii4("FACS"));
        a.jne(fail[BadFacs]);
        a.cmp(__dword_ptr[r14 + 4], 64);
        a.jne(fail[BadFacs]);
        a.test(r14, 63);
        a.jnz(fail[BadFacs]);

        a.mov(r15d, __dword_ptr[rbx + 40]);            // DSDT
        a.cmp(__qword_ptr[rbx + 140], r15);            // X_DSDT: the same
        a.jne(fail[BadDsdt]);
        a.cmp(__dword_ptr[r15], Ascii4("DSDT"));
        a.jne(fail[BadDsdt]);
        a.mov(rdi, r15);
        a.mov(ecx, __dword_ptr[r15 + 4]);
        Checksum(a, fail[BadDsdt]);
    }

    [KvmFact]
    public async Task Port_92_bit_1_reads_back_and_bit_0_resets_the_machine()
    {
        var image = Long(a =>
        {
            var fail = new Failures(a);
            a.mov(al, 0b10);                           // A20 on, no reset
            a.@out(0x92, al);
            a.@in(al, 0x92);
            a.and(al, 0b11);
            a.cmp(al, 0b10);
            a.jne(fail[2]);
            a.mov(al, 0);
            a.@out(0x92, al);
            a.@in(al, 0x92);
            a.test(al, 0b11);
            a.jnz(fail[3]);
            a.mov(al, 0b11);                           // bit 0: 0 → 1
            a.@out(0x92, al);
            Exit(a, 4);                                // still running: no reset
            fail.Emit();
        });
        await using var run = await GuestRun.RunAsync(image);
        Assert.True(run.Outcome.Kind == VmProtocol.OutcomeKind.Reset, $"{run.Outcome} (2: bit 1 not read back as 1, 3: not as 0, 4: no reset)");
        Assert.Equal(VmProtocol.Outcome.ResetCode, run.Outcome.ExitCode);
    }

    [KvmFact]
    public async Task Port_cf9_keeps_sys_rst_and_full_rst_and_rst_cpu_resets_the_machine()
    {
        var image = Long(a =>
        {
            var fail = new Failures(a);
            a.mov(dx, 0xCF9);
            a.mov(al, 0x0A);                           // FULL_RST | SYS_RST, no RST_CPU
            a.@out(dx, al);
            a.@in(al, dx);
            a.cmp(al, 0x0A);
            a.jne(fail[2]);
            a.mov(al, 0x02);
            a.@out(dx, al);
            a.@in(al, dx);
            a.cmp(al, 0x02);
            a.jne(fail[3]);
            a.mov(al, 0x06);                           // SYS_RST | RST_CPU: the FADT's RESET_VALUE
            a.@out(dx, al);
            Exit(a, 4);
            fail.Emit();
        });
        await using var run = await GuestRun.RunAsync(image);
        Assert.True(run.Outcome.Kind == VmProtocol.OutcomeKind.Reset, $"{run.Outcome} (2: 0x0A not read back, 3: 0x02 not read back, 4: no reset)");
        Assert.Equal(VmProtocol.Outcome.ResetCode, run.Outcome.ExitCode);
        Assert.Contains("0xCF9", run.Outcome.Detail);
    }

    [KvmFact]
    public async Task A_guest_finds_fadt_facs_and_dsdt_and_times_itself_on_the_pm_timer()
    {
        var image = Long(a =>
        {
            var fail = new Failures(a);
            var read = a.CreateLabel();
            FindTables(a, fail);

            a.mov(edx, __dword_ptr[rbx + 76]);         // PM_TMR_BLK
            a.test(edx, edx);
            a.jz(fail[TimerTooWide]);
            a.@in(eax, dx);
            a.cmp(eax, 0x100_0000);
            a.jae(fail[TimerTooWide]);
            a.mov(r8d, eax);                           // first
            a.mov(r9d, eax);                           // previous
            a.mov(ecx, 200);
            a.Label(ref read);
            a.@in(eax, dx);
            a.cmp(eax, 0x100_0000);
            a.jae(fail[TimerTooWide]);
            a.mov(r10d, eax);
            a.sub(r10d, r9d);
            a.and(r10d, 0xFF_FFFF);                    // the step, modulo the 24-bit wrap
            a.cmp(r10d, 0x80_0000);
            a.jae(fail[TimerWentBack]);
            a.mov(r9d, eax);
            a.dec(ecx);
            a.jnz(read);
            a.cmp(r9d, r8d);                           // 200 exits later, it has moved
            a.je(fail[TimerStood]);
            Exit(a, 0);
            fail.Emit();
        });
        await using var run = await GuestRun.RunAsync(image);
        Assert.True(run.Outcome is { Kind: VmProtocol.OutcomeKind.DebugExit, ExitCode: 1 }, Explain(run.Outcome));
    }

    [KvmFact]
    public async Task A_guest_powers_off_with_the_s5_sleep_type_of_the_dsdt()
    {
        var image = Long(a =>
        {
            var fail = new Failures(a);
            var scan = a.CreateLabel();
            var found = a.CreateLabel();
            var byteConst = a.CreateLabel();
            var haveType = a.CreateLabel();
            FindTables(a, fail);

            // \_S5: the NameSeg "_S5_" in the AML, then PackageOp, a one-byte PkgLength, NumElements,
            // and the PM1a SLP_TYP as a ByteConst (0x0A, value) or ZeroOp/OneOp.
            a.lea(rsi, __[r15 + 36]);
            a.mov(ecx, __dword_ptr[r15 + 4]);
            a.lea(rdi, __[r15 + rcx - 4]);             // the last place a NameSeg can start
            a.Label(ref scan);
            a.cmp(rsi, rdi);
            a.ja(fail[NoS5]);
            a.cmp(__dword_ptr[rsi], Ascii4("_S5_"));
            a.je(found);
            a.inc(rsi);
            a.jmp(scan);
            a.Label(ref found);
            a.cmp(__byte_ptr[rsi + 4], 0x12);          // PackageOp
            a.jne(fail[NoS5]);
            a.test(__byte_ptr[rsi + 5], 0xC0);         // PkgLength in one byte
            a.jnz(fail[NoS5]);
            a.movzx(eax, __byte_ptr[rsi + 7]);         // the first element
            a.cmp(al, 0x0A);
            a.je(byteConst);
            a.cmp(al, 1);
            a.ja(fail[NoS5]);
            a.jmp(haveType);
            a.Label(ref byteConst);
            a.movzx(eax, __byte_ptr[rsi + 8]);
            a.Label(ref haveType);
            a.mov(r12d, eax);                          // S5's SLP_TYP

            a.mov(edx, __dword_ptr[rbx + 64]);         // PM1a_CNT_BLK
            // Another sleep type with SLP_EN first: not supported, the guest goes on.
            a.mov(eax, r12d);
            a.xor(eax, 0b001);
            a.shl(eax, 10);
            a.or(eax, 1 << 13);
            a.@out(dx, ax);
            a.@in(ax, dx);
            a.mov(ecx, eax);
            a.and(ecx, (1 << 13) | 1);
            a.cmp(ecx, 1);                             // SCI_EN reads 1, SLP_EN 0
            a.jne(fail[BadPm1Control]);
            a.mov(rdi, (long)Marker);
            a.mov(__byte_ptr[rdi], 1);
            // Then S5.
            a.mov(eax, r12d);
            a.shl(eax, 10);
            a.or(eax, (1 << 13) | 1);
            a.@out(dx, ax);
            Exit(a, StillOn);
            fail.Emit();
        });
        await using var run = await GuestRun.RunAsync(image);
        Assert.True(run.Outcome.Kind == VmProtocol.OutcomeKind.PowerOff, Explain(run.Outcome));
        var marker = new byte[1];
        run.Vm.Memory.Read(new GuestPhysAddr(Marker), marker);
        Assert.True(marker[0] == 1, "the write of another sleep type with SLP_EN ended the guest");
        Assert.Equal(VmProtocol.Outcome.PowerOffCode, run.Outcome.ExitCode);
        Assert.Equal(0, run.Outcome.ExitCode);
    }
}
